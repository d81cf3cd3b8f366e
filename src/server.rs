//! Serving: accept on a listener until `shutdown` resolves, then drain
//! in-flight requests (streams included) for at most the grace period, wait
//! for the settlements they left running, and persist the budgets.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;

use crate::app::{AppState, app};

/// How long shutdown waits for the reservations of responses ended at the
/// grace period to settle (they settle as soon as their body notices).
const SETTLE_AT_SHUTDOWN: Duration = Duration::from_secs(5);

/// How long shutdown waits for the queued spans to be exported.
const FLUSH_TRACES_AT_SHUTDOWN: Duration = Duration::from_secs(3);

/// Serves `state` on `listener` until `shutdown` resolves and in-flight
/// requests finish, or `grace` passes after it.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let grace = state.config().server.shutdown_grace;
    let state = Arc::new(state);
    crate::reload::on_sighup(Arc::downgrade(&state));
    // TCP_NODELAY on every accepted socket: without it a chunked response
    // waits for the client's delayed ACK (tens of ms per keep-alive request).
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });

    let (draining_tx, draining_rx) = tokio::sync::oneshot::channel::<()>();
    let app = app(Arc::clone(&state)).into_make_service_with_connect_info::<std::net::SocketAddr>();
    let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        tracing::info!(
            grace_ms = grace.as_millis() as u64,
            "shutting down: draining in-flight requests"
        );
        let _ = draining_tx.send(());
    });
    let grace_expired = async move {
        if draining_rx.await.is_ok() {
            tokio::time::sleep(grace).await;
        } else {
            std::future::pending::<()>().await;
        }
    };

    tokio::select! {
        result = serve => result?,
        () = grace_expired => {
            tracing::warn!("grace period over: ending responses still in flight");
            state.gateway.drain.cancel();
        }
    }
    // Every request has ended (a stream cut at the grace period settled as
    // it was dropped): wait for the settlements still running, then persist.
    match state.gateway.budgets.shutdown(SETTLE_AT_SHUTDOWN).await {
        Ok(()) => tracing::info!("budget usage flushed"),
        Err(e) => tracing::error!("budget usage not flushed: {e}"),
    }
    // The requests' spans have all ended: export what is queued, bounded.
    crate::traces::shutdown(FLUSH_TRACES_AT_SHUTDOWN).await;
    tracing::info!("stopped");
    Ok(())
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
