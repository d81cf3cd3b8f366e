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
//! the idle wait and the header read together with one value.
//!
//! A connection waiting for a request is *parked*: its socket and a small
//! task, nothing of hyper's. hyper keeps an 8 KiB read buffer and an 8 KiB
//! write buffer per connection for as long as the connection lives; parked,
//! an idle connection costs about 1 KiB of heap instead of about 20. So a
//! connection alternates: parked until a byte arrives (or its deadline
//! passes: closed), then served by a hyper connection for as long as
//! requests keep coming; once a response is written and no request follows
//! within [`PARK_AFTER`], hyper's part is ended without closing the socket
//! (`graceful_shutdown` + `poll_without_shutdown`), handing back the socket
//! and any bytes it read ahead. (Parking after every response made each
//! request of a busy keep-alive connection pay for a new hyper connection
//! and a peek at the socket.) When hyper would not simply keep the connection (the client or
//! the response said `Connection: close`; a request body was left unread,
//! which hyper drains if it can), hyper is left to do what it does, and a
//! connection it ends is closed. While hyper serves, [`WatchedIo`] enforces the header deadline
//! on its reads.

use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, Request, Response, Version, header};
use axum::response::IntoResponse;
use bytes::{Buf, Bytes, BytesMut};
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

use crate::app::App;
use crate::config;
use crate::error::ApiError;

/// hyper's limit on a request's header fields when none is set.
const HYPER_MAX_HEADERS: usize = 100;

/// What every connection shares: the application, hyper's settings and
/// the deadlines.
pub(super) struct Connections {
    app: Arc<App>,
    http: http1::Builder,
    header_read_timeout: Duration,
    keep_alive_timeout: Duration,
    /// Cancelled at shutdown: idle connections close, busy ones finish
    /// their request and close.
    closing: CancellationToken,
    /// Hyper connections made, for tests of when a socket is parked.
    #[cfg(test)]
    hyper_connections: AtomicU64,
}

impl Connections {
    pub(super) fn new(app: App, server: &config::Server, closing: CancellationToken) -> Self {
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            // None: WatchedIo's deadlines end every wait, each sooner than
            // hyper's timer would. hyper's (a backstop here until
            // 2026-12-06) made and registered a timer at each request head:
            // about 900 instructions a request, for a deadline never met.
            .header_read_timeout(None)
            .max_header_size(server.max_header_bytes);
        // hyper's own limit is the default 100, kept on the stack; a limit
        // set, even to 100, makes it build (and fill) a vector of that
        // many slots twice per request: 1.7k instructions of 120k.
        if server.max_headers != HYPER_MAX_HEADERS {
            http.max_headers(server.max_headers);
        }
        Self {
            app: Arc::new(app),
            http,
            header_read_timeout: server.header_read_timeout,
            keep_alive_timeout: server.keep_alive_timeout,
            closing,
            #[cfg(test)]
            hyper_connections: AtomicU64::new(0),
        }
    }

    /// Serves one connection until it closes; `_permit` is its place under
    /// `server.max_connections`, given back when this returns.
    pub(super) async fn serve(
        self: Arc<Self>,
        mut stream: TcpStream,
        peer: SocketAddr,
        accepted: Instant,
        _permit: OwnedSemaphorePermit,
    ) {
        // The first request's headers are due from the accept on.
        let mut wait_until = accepted + self.header_read_timeout;
        let mut headers_due = Some(wait_until);
        let mut read_ahead = Bytes::new();
        loop {
            if read_ahead.is_empty() {
                let mut byte = [0u8; 1];
                tokio::select! {
                    biased;
                    () = self.closing.cancelled() => return,
                    // Not `readable()`: it is ready at once on a new socket.
                    ready = tokio::time::timeout_at(wait_until, stream.peek(&mut byte)) => {
                        match ready {
                            Ok(Ok(1..)) => {}
                            Ok(_) => return, // closed by the client, or broken
                            Err(_) => {
                                tracing::debug!("connection closed: no request in time");
                                return;
                            }
                        }
                    }
                }
            }
            let due = headers_due
                .take()
                .unwrap_or_else(|| Instant::now() + self.header_read_timeout);
            // Boxed, so a parked connection's task holds none of it.
            match Box::pin(self.serve_http(stream, peer, read_ahead, due)).await {
                Some(parked) => (stream, read_ahead) = parked,
                None => return,
            }
            wait_until = Instant::now() + self.keep_alive_timeout;
        }
    }

    /// Serves requests on `stream` with hyper until a response has been
    /// written and the connection is idle; returns the socket and the bytes
    /// hyper read beyond its last request, or `None` once it is closed.
    async fn serve_http(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        read_ahead: Bytes,
        headers_due: Instant,
    ) -> Option<(TcpStream, Bytes)> {
        #[cfg(test)]
        self.hyper_connections.fetch_add(1, Ordering::Relaxed);
        let requests = Arc::new(Requests::default());
        let io = WatchedIo {
            stream,
            read_ahead,
            requests: Arc::clone(&requests),
            header_read_timeout: self.header_read_timeout,
            keep_alive_timeout: self.keep_alive_timeout,
            phase: Phase::Head(headers_due),
            finished_seen: 0,
            sleep: Box::pin(tokio::time::sleep_until(headers_due)),
        };
        let service = Service {
            app: Arc::clone(&self.app),
            peer,
            requests: Arc::clone(&requests),
        };
        let mut connection = self.http.serve_connection(TokioIo::new(io), service);
        let mut closing = pin!(self.closing.cancelled());
        // Set once hyper was asked to end: to park the socket, or to close.
        let mut ending = None;
        // While the connection is idle after a response: until when hyper
        // may wait for the next request itself, and after how many
        // finished requests that was set.
        let mut grace: Option<(u64, Pin<Box<Sleep>>)> = None;
        let result = poll_fn(|cx| {
            if ending != Some(Ending::Close) && closing.as_mut().poll(cx).is_ready() {
                Pin::new(&mut connection).graceful_shutdown();
                ending = Some(Ending::Close);
            }
            loop {
                match connection.poll_without_shutdown(cx) {
                    // A response is written, nothing else is in flight and
                    // hyper would keep the connection. A client that sends
                    // its next request within `PARK_AFTER` is served by the
                    // same hyper connection; otherwise hyper's part ends (at
                    // once if idle, else once the response is flushed) and
                    // the socket is parked. Otherwise hyper goes on as it
                    // would (it drains an unread body or closes).
                    Poll::Pending
                        if ending.is_none()
                            && requests.all_finished()
                            && requests.parkable.load(Ordering::Relaxed) =>
                    {
                        let finished = requests.finished.load(Ordering::Relaxed);
                        let park_at = Instant::now() + PARK_AFTER;
                        let (armed_at, sleep) = grace.get_or_insert_with(|| {
                            (finished, Box::pin(tokio::time::sleep_until(park_at)))
                        });
                        if *armed_at != finished {
                            *armed_at = finished;
                            sleep.as_mut().reset(park_at);
                        }
                        if sleep.as_mut().poll(cx).is_pending() {
                            return Poll::Pending;
                        }
                        Pin::new(&mut connection).graceful_shutdown();
                        ending = Some(Ending::Park);
                    }
                    other => return other,
                }
            }
        })
        .await;
        if let Err(e) = result {
            tracing::debug!("connection closed: {e}");
            return None;
        }
        let parts = connection.into_parts();
        let mut io = parts.io.into_inner();
        // hyper ended by itself (the client or the response said close, a
        // body could not be drained, the client closed) or for shutdown:
        // close the socket, as hyper would have.
        if ending != Some(Ending::Park) || self.closing.is_cancelled() {
            let _ = io.stream.shutdown().await;
            return None;
        }
        // What hyper read ahead comes before what it was not yet given.
        // Copied (rarely anything): even empty, `read_buf` holds on to
        // hyper's whole read buffer.
        let read_ahead = if parts.read_buf.is_empty() {
            io.read_ahead
        } else {
            let mut both = BytesMut::from(&parts.read_buf[..]);
            both.extend_from_slice(&io.read_ahead);
            both.freeze()
        };
        Some((io.stream, read_ahead))
    }
}

/// How long a connection stays with hyper after a response, for the next
/// request: a client sending requests back to back keeps one hyper
/// connection (its buffers, no new connection state per request), and an
/// idle one is parked this soon.
const PARK_AFTER: Duration = Duration::from_millis(50);

/// Why hyper was asked to end its connection.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Ending {
    /// The response is written: the socket goes on, parked.
    Park,
    /// The server is shutting down.
    Close,
}

/// What one hyper connection's requests have done: [`WatchedIo`] reads
/// whether one is in flight, [`Connections::serve_http`] whether the
/// connection may be parked. Everything of a connection runs on its one
/// task, so relaxed ordering suffices.
#[derive(Default)]
struct Requests {
    started: AtomicU64,
    finished: AtomicU64,
    /// Whether hyper would keep the connection after the latest request:
    /// set when it starts, cleared when it or its response asks for the
    /// connection to close, or its body is dropped unread (hyper then
    /// drains what has arrived or closes).
    parkable: AtomicBool,
}

impl Requests {
    /// At least one request was answered and none is in flight.
    fn all_finished(&self) -> bool {
        let finished = self.finished.load(Ordering::Relaxed);
        finished > 0 && self.started.load(Ordering::Relaxed) == finished
    }

    fn not_parkable(&self) {
        self.parkable.store(false, Ordering::Relaxed);
    }
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

/// Whether a `Connection` header lists `token`.
fn connection_says(headers: &HeaderMap, token: &str) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|value| {
        value
            .to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// Whether the client lets the connection live on after this request (as
/// hyper decides it: HTTP/1.1 unless `close`, HTTP/1.0 only with
/// `keep-alive`).
fn client_keeps_alive(version: Version, headers: &HeaderMap) -> bool {
    match version {
        Version::HTTP_11 => !connection_says(headers, "close"),
        Version::HTTP_10 => {
            connection_says(headers, "keep-alive") && !connection_says(headers, "close")
        }
        _ => false,
    }
}

/// The application as hyper's per-connection service.
struct Service {
    app: Arc<App>,
    /// The client's address, for handlers (as axum's `ConnectInfo`).
    peer: SocketAddr,
    requests: Arc<Requests>,
}

impl hyper::service::Service<Request<Incoming>> for Service {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let in_flight = InFlight::start(&self.requests);
        self.requests.parkable.store(
            client_keeps_alive(request.version(), request.headers()),
            Ordering::Relaxed,
        );
        let requests = Arc::clone(&self.requests);
        let mut request = request.map(|body| {
            Body::new(RequestBody {
                body,
                requests: Arc::clone(&requests),
                ended: false,
            })
        });
        request.extensions_mut().insert(ConnectInfo(self.peer));
        let app = Arc::clone(&self.app);
        Box::pin(async move {
            let response = app.serve(request).await;
            if connection_says(response.headers(), "close") {
                requests.not_parkable();
            }
            Ok(response.map(|body| TrackedBody {
                body,
                _in_flight: in_flight,
            }))
        })
    }
}

/// A request body that marks the connection not parkable if it is dropped
/// before its end: the rest of it may still be on the way, for hyper to
/// drain.
struct RequestBody {
    body: Incoming,
    requests: Arc<Requests>,
    /// Polled to its end (a chunked body never says `is_end_stream`).
    ended: bool,
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(None) = frame {
            self.ended = true;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if !self.ended && !http_body::Body::is_end_stream(&self.body) {
            self.requests.not_parkable();
        }
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
    /// Bytes read from the socket by the previous hyper connection but not
    /// parsed: given to hyper before anything more is read.
    read_ahead: Bytes,
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
        let result = if this.read_ahead.is_empty() {
            Pin::new(&mut this.stream).poll_read(cx, buf)
        } else {
            let n = this.read_ahead.len().min(buf.remaining());
            buf.put_slice(&this.read_ahead[..n]);
            this.read_ahead.advance(n);
            Poll::Ready(Ok(()))
        };
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

/// How long a refused connection may take: to start sending its request
/// (answered once it has: most HTTP clients treat an answer that arrives
/// before their request as a broken connection), then to be read after the
/// answer (closing a socket with unread data makes the kernel reset it,
/// which can destroy the answer before the client reads it).
const REFUSAL_LINGER: Duration = Duration::from_secs(2);

/// At most this many refused connections linger at once; beyond, one is
/// answered and closed at once.
const REFUSALS_LINGERING: usize = 512;

/// The answer to a connection over `server.max_connections`.
pub(super) struct OverCapacity {
    /// A whole HTTP/1.1 response: 503 `too_many_connections`.
    response: Bytes,
    lingering: Arc<Semaphore>,
}

impl OverCapacity {
    pub(super) async fn new(max_connections: usize) -> Self {
        Self {
            response: http1_bytes(ApiError::too_many_connections(max_connections).into_response())
                .await,
            lingering: Arc::new(Semaphore::new(REFUSALS_LINGERING)),
        }
    }

    /// Answers 503 as soon as the request starts (there is no room to read
    /// it whole) and closes.
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
                let mut sink = [0u8; 1024];
                if stream.read(&mut sink).await? == 0 {
                    return Ok(());
                }
                stream.write_all(&response).await?;
                stream.shutdown().await?;
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
    use axum::Router;

    /// Requests sent back to back on one socket are served by one hyper
    /// connection; one sent after the socket sat idle past `PARK_AFTER`
    /// finds it parked, and a new hyper connection serves it.
    #[tokio::test]
    async fn back_to_back_requests_keep_hyper_and_an_idle_socket_is_parked() {
        let router = Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let server = config::Server {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            max_body_bytes: 1024,
            shutdown_grace: Duration::from_secs(1),
            header_read_timeout: Duration::from_secs(5),
            body_read_timeout: Duration::from_secs(5),
            keep_alive_timeout: Duration::from_secs(5),
            max_header_bytes: 16 * 1024,
            max_headers: 100,
            max_connections: 10,
            request_limits: crate::openai::chat::RequestLimits::DEFAULT,
            trusted_proxies: Vec::new(),
        };
        let connections = Arc::new(Connections::new(
            App::routed(router),
            &server,
            CancellationToken::new(),
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let serving = Arc::clone(&connections);
        tokio::spawn(async move {
            let (stream, peer) = listener.accept().await.expect("accept");
            let permit = Arc::new(Semaphore::new(1))
                .acquire_owned()
                .await
                .expect("permit");
            serving.serve(stream, peer, Instant::now(), permit).await;
        });
        let mut client = TcpStream::connect(addr).await.expect("connect");
        let mut ask = async || {
            client
                .write_all(b"GET / HTTP/1.1\r\nhost: iris\r\n\r\n")
                .await
                .expect("write");
            let mut answer = Vec::new();
            while !answer.ends_with(b"ok") {
                let mut chunk = [0u8; 512];
                let n = client.read(&mut chunk).await.expect("read");
                assert!(n > 0, "closed: {}", String::from_utf8_lossy(&answer));
                answer.extend_from_slice(&chunk[..n]);
            }
            assert!(answer.starts_with(b"HTTP/1.1 200 OK"));
        };
        for _ in 0..5 {
            ask().await;
        }
        let made = || connections.hyper_connections.load(Ordering::Relaxed);
        assert_eq!(
            made(),
            1,
            "five requests back to back, one hyper connection"
        );
        tokio::time::sleep(PARK_AFTER * 4).await;
        ask().await;
        assert_eq!(made(), 2, "parked while idle, then served anew");
    }

    #[tokio::test]
    async fn the_refusal_is_a_whole_openai_shaped_503_that_closes() {
        let bytes = OverCapacity::new(7).await.response;
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
