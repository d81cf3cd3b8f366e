//! Serving: accept on a listener until `shutdown` resolves, then drain
//! in-flight requests (streams included) for at most the grace period, wait
//! for the settlements they left running, persist the budgets and write the
//! spend log's queue.
//!
//! Each accepted connection is served by [`connection`] under deadlines on
//! its headers and its idle time, with limits on header size and count;
//! at most `server.max_connections` are served at once, and one more is
//! answered 503 `too_many_connections` and closed.

mod connection;

use std::future::Future;
use std::io;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::app;
use crate::state::AppState;
use connection::{Connections, OverCapacity};

/// How long shutdown waits for the reservations of responses ended at the
/// grace period to settle (they settle as soon as their body notices).
const SETTLE_AT_SHUTDOWN: Duration = Duration::from_secs(5);

/// How long shutdown waits for the spend log's queue to be written.
const SPEND_LOG_AT_SHUTDOWN: Duration = Duration::from_secs(5);

/// File descriptors kept for what is not a client connection: upstream
/// connections, the store, the listener, logs.
const OTHER_FILES: u64 = 256;
/// How long shutdown waits for the queued spans to be exported.
const FLUSH_TRACES_AT_SHUTDOWN: Duration = Duration::from_secs(3);

/// Serves `state` on `listener` until `shutdown` resolves and in-flight
/// requests finish, or `grace` passes after it.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let server = state.config().server.clone();
    let state = Arc::new(state);
    crate::reload::on_sighup(Arc::downgrade(&state));
    warn_if_files_limited(server.max_connections);
    let closing = CancellationToken::new();
    let connections = Arc::new(Connections::new(
        app(Arc::clone(&state)),
        &server,
        closing.clone(),
    ));
    let over_capacity = OverCapacity::new(server.max_connections).await;
    let permits = Arc::new(Semaphore::new(server.max_connections));
    let tracker = TaskTracker::new();
    let mut shutdown = pin!(shutdown);
    let mut at_limit = false;
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                accept_failed(&e).await;
                continue;
            }
        };
        let accepted = Instant::now();
        // TCP_NODELAY on every accepted socket: without it a chunked response
        // waits for the client's delayed ACK (tens of ms per keep-alive request).
        let _ = stream.set_nodelay(true);
        match Arc::clone(&permits).try_acquire_owned() {
            Ok(permit) => {
                at_limit = false;
                tracker.spawn(Arc::clone(&connections).serve(stream, peer, accepted, permit));
            }
            Err(_) => {
                if !at_limit {
                    tracing::warn!(
                        max_connections = server.max_connections,
                        "connection limit reached: new connections are answered 503 until some close"
                    );
                    at_limit = true;
                }
                over_capacity.refuse(stream);
            }
        }
    }
    // New connections are refused by the kernel from here on.
    drop(listener);
    let grace = server.shutdown_grace;
    tracing::info!(
        grace_ms = grace.as_millis() as u64,
        "shutting down: draining in-flight requests"
    );
    closing.cancel();
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!("grace period over: ending responses still in flight");
        state.gateway.drain.cancel();
    }
    // Every request has ended (a stream cut at the grace period settled as
    // it was dropped): wait for the settlements still running, then persist.
    match state.gateway.budgets.shutdown(SETTLE_AT_SHUTDOWN).await {
        Ok(()) => tracing::info!("budget usage flushed"),
        Err(e) => tracing::error!("budget usage not flushed: {e}"),
    }
    // Settlements are done, so every record is queued: write them.
    if !state.spend.shutdown(SPEND_LOG_AT_SHUTDOWN).await {
        tracing::error!("spend log: records still queued at shutdown were not written");
    }
    // The requests' spans have all ended: export what is queued, bounded.
    crate::traces::shutdown(FLUSH_TRACES_AT_SHUTDOWN).await;
    tracing::info!("stopped");
    Ok(())
}

/// A failed accept: one client's trouble (it reset before it was accepted)
/// is skipped; anything else, most often no file descriptor left, is logged
/// and waited out briefly rather than retried in a busy loop.
async fn accept_failed(error: &io::Error) {
    use io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        error.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!("accepting a connection failed: {error}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Warns when the process may not open enough files for
/// `server.max_connections` clients: past the limit, accepting fails
/// (logged) and clients wait in the backlog instead of getting the 503.
fn warn_if_files_limited(max_connections: usize) {
    let Some(limit) = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| open_files_limit(&limits))
    else {
        return;
    };
    if limit < max_connections as u64 + OTHER_FILES {
        tracing::warn!(
            max_connections,
            open_files_limit = limit,
            "the open-files limit (ulimit -n, LimitNOFILE) is below server.max_connections \
             plus {OTHER_FILES}: raise it, or lower server.max_connections"
        );
    }
}

/// The soft "Max open files" of a `/proc/PID/limits` text; `None` when
/// unlimited or absent.
fn open_files_limit(limits: &str) -> Option<u64> {
    limits
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|soft| soft.parse().ok())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {},
        () = terminate => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_files_limit_is_the_soft_one() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             63465                63465                processes \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(open_files_limit(limits), Some(1024));
        assert_eq!(
            open_files_limit(
                "Max open files            unlimited            unlimited            files\n"
            ),
            None
        );
        assert_eq!(open_files_limit(""), None);
    }
}
