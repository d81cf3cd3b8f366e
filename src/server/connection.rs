//! One accepted connection, from accept to close, with the deadlines that
//! keep a slow or idle client from holding it:
//!
//! - its first request's line and headers must arrive within
//!   `header_read_timeout` of the accept, a later request's within
//!   `header_read_timeout` of its first byte;
//! - between requests it may wait `keep_alive_timeout` for the next one;
//! - while a request is in flight neither applies: its body has its own
//!   deadline ([`crate::body_deadline`]), its answer the upstream's timeouts.
//!
//! hyper's own `header_read_timeout` cannot express this: its one timer
//! starts when hyper begins waiting for a request head, which on a kept-alive
//! connection is as soon as the previous response was written, so it bounds
//! the idle wait and the header read together with one value. The deadlines
//! are kept here instead, by [`WatchedIo`]: hyper reads through it exactly
//! while it waits for a request, so a read that waits past the deadline fails
//! the connection. hyper's timer is still set, far beyond ours, because only
//! with it does hyper go back to reading as soon as a response is written.
//!
//! Until a new connection sends its first byte nothing of hyper's exists for
//! it (hyper allocates its 8 KiB read and write buffers per connection):
//! an idle connection costs its socket and a small task.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response};
use axum::response::IntoResponse;
use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::config;
use crate::error::ApiError;

/// What every connection shares: the router, hyper's settings and the
/// deadlines.
pub(super) struct Connections {
    router: Router,
    http: http1::Builder,
    header_read_timeout: Duration,
    keep_alive_timeout: Duration,
    /// Cancelled at shutdown: idle connections close, busy ones finish
    /// their request and close.
    closing: CancellationToken,
}

impl Connections {
    pub(super) fn new(router: Router, server: &config::Server, closing: CancellationToken) -> Self {
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            // Only so that hyper reads again as soon as a response is
            // written (see the module's comment); WatchedIo's deadlines
            // always end a wait before this does.
            .header_read_timeout(server.header_read_timeout + server.keep_alive_timeout)
            .max_header_size(server.max_header_bytes)
            .max_headers(server.max_headers);
        Self {
            router,
            http,
            header_read_timeout: server.header_read_timeout,
            keep_alive_timeout: server.keep_alive_timeout,
            closing,
        }
    }

    /// Serves one connection until it closes; `_permit` is its place under
    /// `server.max_connections`, given back when this returns.
    pub(super) async fn serve(
        self: Arc<Self>,
        stream: TcpStream,
        accepted: Instant,
        _permit: OwnedSemaphorePermit,
    ) {
        let headers_due = accepted + self.header_read_timeout;
        tokio::select! {
            biased;
            () = self.closing.cancelled() => return,
            ready = tokio::time::timeout_at(headers_due, stream.readable()) => {
                if !matches!(ready, Ok(Ok(()))) {
                    tracing::debug!("connection closed: no request within the header deadline");
                    return;
                }
            }
        }
        // Boxed: the waiting above stays a small task, and hyper's state is
        // only allocated for a connection with a request coming.
        Box::pin(self.serve_http(stream, headers_due)).await;
    }

    async fn serve_http(&self, stream: TcpStream, headers_due: Instant) {
        let requests = Arc::new(Requests::default());
        let io = WatchedIo {
            stream,
            requests: Arc::clone(&requests),
            header_read_timeout: self.header_read_timeout,
            keep_alive_timeout: self.keep_alive_timeout,
            phase: Phase::Head(headers_due),
            finished_seen: 0,
            sleep: Box::pin(tokio::time::sleep_until(headers_due)),
        };
        let service = Service {
            router: self.router.clone(),
            requests,
        };
        let mut connection = pin!(self.http.serve_connection(TokioIo::new(io), service));
        let result = tokio::select! {
            result = connection.as_mut() => result,
            () = self.closing.cancelled() => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        if let Err(e) = result {
            tracing::debug!("connection closed: {e}");
        }
    }
}

/// Requests started and finished on one connection: [`WatchedIo`] reads them
/// to know whether one is in flight. Everything of a connection runs on its
/// one task, so relaxed ordering suffices.
#[derive(Default)]
struct Requests {
    started: AtomicU64,
    finished: AtomicU64,
}

/// One request in flight, from its headers until hyper has taken the last
/// of its response body (or dropped it).
struct InFlight(Arc<Requests>);

impl InFlight {
    fn start(requests: &Arc<Requests>) -> Self {
        requests.started.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(requests))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.finished.fetch_add(1, Ordering::Relaxed);
    }
}

/// The router as hyper's per-connection service.
struct Service {
    router: Router,
    requests: Arc<Requests>,
}

impl hyper::service::Service<Request<Incoming>> for Service {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let in_flight = InFlight::start(&self.requests);
        let response = self.router.clone().oneshot(request.map(Body::new));
        Box::pin(async move {
            let response = match response.await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            Ok(response.map(|body| TrackedBody {
                body,
                _in_flight: in_flight,
            }))
        })
    }
}

/// A response body that ends its request's time in flight when hyper drops
/// it (after its last frame, or when the connection fails).
struct TrackedBody {
    body: Body,
    _in_flight: InFlight,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Where a connection is between requests.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    /// A request's line and headers are due by then.
    Head(Instant),
    /// No request in flight; the next one must start by then.
    Idle(Instant),
    /// A request is in flight.
    Busy,
}

/// The socket as hyper reads it: a read that waits past the phase's
/// deadline fails with `TimedOut`, which ends the connection.
struct WatchedIo {
    stream: TcpStream,
    requests: Arc<Requests>,
    header_read_timeout: Duration,
    keep_alive_timeout: Duration,
    phase: Phase,
    /// `requests.finished` when `phase` was last updated.
    finished_seen: u64,
    sleep: Pin<Box<Sleep>>,
}

impl WatchedIo {
    /// Brings `phase` up to date with the requests started and finished
    /// since it was last looked at.
    fn refresh(&mut self) {
        let started = self.requests.started.load(Ordering::Relaxed);
        let finished = self.requests.finished.load(Ordering::Relaxed);
        if started != finished {
            self.phase = Phase::Busy;
        } else if finished != self.finished_seen || self.phase == Phase::Busy {
            self.finished_seen = finished;
            self.phase = Phase::Idle(Instant::now() + self.keep_alive_timeout);
        }
    }
}

impl AsyncRead for WatchedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.stream).poll_read(cx, buf);
        this.refresh();
        match result {
            Poll::Ready(Ok(())) => {
                // The first byte of the next request: its headers are due.
                if buf.filled().len() > before && matches!(this.phase, Phase::Idle(_)) {
                    this.phase = Phase::Head(Instant::now() + this.header_read_timeout);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let (due, what) = match this.phase {
                    Phase::Head(due) => (due, "request headers not received in time"),
                    Phase::Idle(due) => (due, "kept-alive connection idle too long"),
                    Phase::Busy => return Poll::Pending,
                };
                if this.sleep.deadline() != due {
                    this.sleep.as_mut().reset(due);
                }
                match this.sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, what)))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// How long a refused connection is kept open after its 503, reading what
/// the client sends: closing a socket with unread data makes the kernel
/// answer with a reset, which can destroy the 503 before the client reads it.
const REFUSAL_LINGER: Duration = Duration::from_secs(2);

/// At most this many refused connections linger at once; beyond, one is
/// answered and closed at once.
const REFUSALS_LINGERING: usize = 512;

/// The answer to a connection over `server.max_connections`.
pub(super) struct Refusal {
    /// A whole HTTP/1.1 response: 503 `too_many_connections`.
    response: Bytes,
    lingering: Arc<Semaphore>,
}

impl Refusal {
    pub(super) async fn new(max_connections: usize) -> Self {
        Self {
            response: http1_bytes(ApiError::too_many_connections(max_connections).into_response())
                .await,
            lingering: Arc::new(Semaphore::new(REFUSALS_LINGERING)),
        }
    }

    /// Answers 503 before reading the request (there is no room to read
    /// it) and closes.
    pub(super) fn refuse(&self, mut stream: TcpStream) {
        let Ok(permit) = Arc::clone(&self.lingering).try_acquire_owned() else {
            // A new socket's send buffer is empty: the answer fits.
            let _ = stream.try_write(&self.response);
            return;
        };
        let response = self.response.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(REFUSAL_LINGER, async {
                stream.write_all(&response).await?;
                stream.shutdown().await?;
                let mut sink = [0u8; 1024];
                let mut read = 0;
                while read < 64 * 1024 {
                    match stream.read(&mut sink).await? {
                        0 => break,
                        n => read += n,
                    }
                }
                Ok::<_, io::Error>(())
            })
            .await;
        });
    }
}

/// A response with a complete body as HTTP/1.1 bytes (for answering without
/// hyper).
async fn http1_bytes(response: axum::response::Response) -> Bytes {
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let mut out = BytesMut::new();
    out.extend_from_slice(
        format!(
            "HTTP/1.1 {} {}\r\n",
            parts.status.as_u16(),
            parts.status.canonical_reason().unwrap_or("")
        )
        .as_bytes(),
    );
    for (name, value) in &parts.headers {
        if name != axum::http::header::CONTENT_LENGTH {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
    out.extend_from_slice(&body);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_refusal_is_a_whole_openai_shaped_503_that_closes() {
        let bytes = Refusal::new(7).await.response;
        let text = std::str::from_utf8(&bytes).expect("text");
        let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
        assert!(
            head.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{head}"
        );
        let head = head.to_ascii_lowercase();
        for line in [
            "connection: close",
            "content-type: application/json",
            "retry-after: 1",
            &format!("content-length: {}", body.len()),
        ] {
            assert!(head.contains(line), "{line:?} missing from {head}");
        }
        let json: serde_json::Value = serde_json::from_str(body).expect("json");
        assert_eq!(json["error"]["code"], "too_many_connections");
        assert_eq!(json["error"]["type"], "api_error");
        assert!(
            json["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("(7)")),
            "{json}"
        );
    }
}
