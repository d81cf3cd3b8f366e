//! A mock OpenAI-compatible upstream: answers chat completions (plain or
//! streamed) and embeddings (floats, or base64 when asked), records every
//! request it receives, and fails on cue (embeddings take the same faults
//! and headers as chat completions, where they apply). Start as
//! many as a test needs (each on its own port 0): a farm of upstreams.
//!
//! Shared by the integration tests, the quickstart example and the load
//! benchmark. Tests steer it in two ways.
//!
//! Request headers, which Iris forwards (the SDK suite and the benchmark,
//! which drive the mock as a separate process, rely on these):
//! - `x-mock-status: N` answers N with an OpenAI-shaped error body;
//! - `x-mock-delay-ms: N` waits before the response head;
//! - `x-mock-chunks: N` streams N content chunks (default 3);
//! - `x-mock-chunk-delay-ms: N` waits between streamed chunks;
//! - `x-mock-die-after: K` streams K content chunks, then the connection
//!   dies (no finish, no `[DONE]`, no terminating chunk);
//! - `x-mock-no-usage: 1` reports no usage at all;
//! - `x-mock-usage: {JSON}` reports that object as the `usage`, plain or
//!   streamed (cached and reasoning token details, say);
//! - `x-mock-plain: 1` answers a plain JSON body even to `stream: true`;
//! - `x-mock-stray-byte: 1` puts a byte that is not UTF-8 (0xFF) in a plain
//!   answer's message text, as a broken provider might;
//! - `x-mock-content-parts: 1` gives a plain answer's message `content` as
//!   a list of text parts, as some providers do, rather than a string;
//! - `x-mock-echo: 1` answers (not streamed) with the request body it
//!   received as the message content, so a test that only sees responses
//!   (the SDK suite, driving the example) can check what Iris forwarded;
//! - `x-mock-echo-auth: N` answers N (a 401, say) as a careless provider
//!   does: its error body echoes the `Authorization` header it received,
//!   and it sets `Set-Cookie`, `Server` and `Alt-Svc`;
//! - `x-mock-set-header: NAME: VALUE` (repeatable) adds that header to the
//!   answer, whatever the answer is.
//!
//! A script of [`Fault`]s, per instance, for the next requests whatever
//! their headers ([`MockUpstream::fail_next`], [`MockUpstream::fail_always`],
//! [`MockUpstream::heal`]); and [`MockUpstream::stop`] /
//! [`MockUpstream::restart`] for an upstream that refuses connections
//! ([`refused_base_url`] for one that never listened).
//!
//! [`MockUpstream::start_tls`] serves the same over HTTPS, with the
//! certificate the test gives it.
//!
//! `GET /mock/stats` answers `{"chat_requests": N}`, every request
//! (chat completion or embeddings) received so far (counted even with bodies not kept, faults
//! included), so such a test can tell whether a request reached the upstream.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tower::ServiceExt as _;

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Received {
    /// HTTP/1.1, or HTTP/2 where TLS chose it.
    pub version: http::Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// When its body had arrived.
    pub at: Instant,
}

impl Received {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// What the mock does to one chat request instead of answering it well.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answers `status` with an OpenAI-shaped error body, with a
    /// `Retry-After: <s>` and/or `retry-after-ms: <ms>` header when given.
    Status {
        status: u16,
        retry_after_s: Option<u64>,
        retry_after_ms: Option<u64>,
    },
    /// Resets the connection (TCP RST) once the request has arrived, before
    /// any byte of an answer.
    Reset,
    /// Never answers: no response head, the connection held open.
    Hang,
    /// A 200 event stream: the role chunk and K content chunks, then the
    /// connection dies (no finish, no `[DONE]`, no terminating chunk).
    DieAfter(usize),
    /// A 200 event stream: the role chunk, K content chunks, the finish
    /// chunk and the usage chunk when asked for, then the connection dies
    /// before `[DONE]`.
    DieBeforeDone(usize),
    /// A 200 event stream: the role chunk and K content chunks, then silence
    /// with the connection open, until the reader goes away.
    StallAfter(usize),
    /// A 200 event stream: the role chunk and K content chunks, then a clean
    /// end of the body with no `finish_reason` and no `[DONE]`.
    EndWithoutDone(usize),
    /// A 200 labelled `application/json` whose body is an HTML page.
    GarbageJson,
    /// A 200 labelled `text/event-stream` whose body is an HTML page.
    GarbageSse,
    /// A 200 `application/json` body that starts as a completion and stops
    /// half-way through (a clean end of a body that is not JSON).
    TruncatedJson,
    /// A 200 `application/json` completion of about N bytes (its content
    /// that long), sent in 64 KiB chunks, its usage at the very end.
    Huge(usize),
}

impl Fault {
    /// `status` with an error body and no retry hint.
    pub fn status(status: u16) -> Self {
        Self::Status {
            status,
            retry_after_s: None,
            retry_after_ms: None,
        }
    }

    /// 429 with `Retry-After: <seconds>`.
    pub fn retry_after_s(seconds: u64) -> Self {
        Self::Status {
            status: 429,
            retry_after_s: Some(seconds),
            retry_after_ms: None,
        }
    }

    /// 429 with `retry-after-ms: <ms>`.
    pub fn retry_after_ms(ms: u64) -> Self {
        Self::Status {
            status: 429,
            retry_after_s: None,
            retry_after_ms: Some(ms),
        }
    }
}

/// The faults waiting for the next requests: steps in order, then the
/// standing one.
#[derive(Debug, Default)]
struct Script {
    steps: VecDeque<(Fault, usize)>,
    always: Option<Fault>,
}

impl Script {
    fn next(&mut self) -> Option<Fault> {
        if let Some((fault, left)) = self.steps.front_mut() {
            let fault = fault.clone();
            *left -= 1;
            if *left == 0 {
                self.steps.pop_front();
            }
            return Some(fault);
        }
        self.always.clone()
    }
}

#[derive(Clone)]
pub struct MockState {
    pub received: Arc<Mutex<Vec<Received>>>,
    /// Off for long-running use (the example, the benchmark).
    record: Arc<AtomicBool>,
    /// Streams that ended because the reader went away.
    pub cancelled_streams: Arc<Mutex<u32>>,
    /// Chat completion requests received, recorded or not, faults included.
    pub chat_requests: Arc<AtomicU64>,
    script: Arc<Mutex<Script>>,
    /// Chat requests being answered now, and the most ever at once.
    in_flight: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

impl Default for MockState {
    fn default() -> Self {
        Self {
            received: Arc::default(),
            record: Arc::new(AtomicBool::new(true)),
            cancelled_streams: Arc::default(),
            chat_requests: Arc::default(),
            script: Arc::default(),
            in_flight: Arc::default(),
            peak: Arc::default(),
        }
    }
}

impl MockState {
    pub fn keep_bodies(&self, keep: bool) {
        self.record.store(keep, Ordering::Relaxed);
    }

    fn next_fault(&self) -> Option<Fault> {
        self.script.lock().ok()?.next()
    }

    fn enter(&self) -> InFlight {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        InFlight(Arc::clone(&self.in_flight))
    }
}

/// Counts a chat request in flight for as long as it lives (a stream's
/// lives in its body).
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct MockUpstream {
    pub addr: SocketAddr,
    pub state: MockState,
    server: Arc<Server>,
}

impl MockUpstream {
    /// Starts on `127.0.0.1:0` (or `listen`), serving until the runtime
    /// stops (or [`Self::stop`]).
    pub async fn start_on(listen: &str) -> std::io::Result<Self> {
        Self::start_with(listen, None).await
    }

    /// Starts on `127.0.0.1:0`, answering over HTTPS with `tls`'s
    /// certificate (HTTP/2 when its ALPN chooses it, else HTTP/1.1);
    /// [`Self::base_url`] says `https://127.0.0.1:port/v1`.
    pub async fn start_tls(tls: Arc<rustls::ServerConfig>) -> Self {
        Self::start_with("127.0.0.1:0", Some(tokio_rustls::TlsAcceptor::from(tls)))
            .await
            .unwrap_or_else(|e| panic!("mock upstream: {e}"))
    }

    async fn start_with(
        listen: &str,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let state = MockState::default();
        let router = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/embeddings", post(chat))
            .route("/mock/stats", get(stats))
            .with_state(state.clone());
        let server = Arc::new(Server {
            router,
            tls,
            accept: Mutex::new(None),
            connections: Arc::default(),
        });
        server.serve(listener);
        Ok(Self {
            addr,
            state,
            server,
        })
    }

    pub async fn start() -> Self {
        Self::start_on("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("mock upstream: {e}"))
    }

    /// `http://addr/v1` (`https://` over TLS), for an upstream's `base_url`.
    pub fn base_url(&self) -> String {
        let scheme = if self.server.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}/v1", self.addr)
    }

    pub fn received(&self) -> Vec<Received> {
        self.state
            .received
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    pub fn last(&self) -> Received {
        self.received()
            .pop()
            .unwrap_or_else(|| panic!("the mock upstream received nothing"))
    }

    pub fn cancelled_streams(&self) -> u32 {
        self.state.cancelled_streams.lock().map(|c| *c).unwrap_or(0)
    }

    /// Chat requests received so far, faulted ones included.
    pub fn requests(&self) -> u64 {
        self.state.chat_requests.load(Ordering::SeqCst)
    }

    /// The most chat requests it was answering at once.
    pub fn peak_in_flight(&self) -> usize {
        self.state.peak.load(Ordering::SeqCst)
    }

    /// The next `times` chat requests get `fault` (after the faults already
    /// scripted).
    pub fn fail_next(&self, times: usize, fault: Fault) {
        if times == 0 {
            return;
        }
        if let Ok(mut script) = self.state.script.lock() {
            script.steps.push_back((fault, times));
        }
    }

    /// Every chat request from now on gets `fault`, once the scripted ones
    /// are used up, until [`Self::heal`].
    pub fn fail_always(&self, fault: Fault) {
        if let Ok(mut script) = self.state.script.lock() {
            script.always = Some(fault);
        }
    }

    /// Forgets every scripted fault: the next requests are answered well.
    pub fn heal(&self) {
        if let Ok(mut script) = self.state.script.lock() {
            *script = Script::default();
        }
    }

    /// Stops listening and drops every open connection (pooled ones
    /// included), so a connection attempt is refused and nothing in flight
    /// is answered; what was counted and recorded stays.
    pub async fn stop(&self) {
        self.server.stop().await;
    }

    /// Listens again on the same address after [`Self::stop`].
    pub async fn restart(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("mock upstream: listen again on {}: {e}", self.addr),
            }
        };
        self.server.serve(listener);
    }
}

/// A `base_url` on loopback where nothing listens: connections are refused.
pub fn refused_base_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap_or_else(|e| panic!("bind a port to free: {e}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("addr: {e}"));
    drop(listener);
    format!("http://{addr}/v1")
}

/// The accept loop and every open connection, so they can be stopped.
struct Server {
    router: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    accept: Mutex<Option<JoinHandle<()>>>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Server {
    fn serve(&self, listener: TcpListener) {
        let router = self.router.clone();
        let tls = self.tls.clone();
        let connections = Arc::clone(&self.connections);
        let task = tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    // Out of descriptors, or a connection gone before it
                    // was accepted: keep serving.
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let task = tokio::spawn(connection(stream, router.clone(), tls.clone()));
                if let Ok(mut open) = connections.lock() {
                    open.retain(|task| !task.is_finished());
                    open.push(task);
                }
            }
        });
        if let Ok(mut accept) = self.accept.lock() {
            *accept = Some(task);
        }
    }

    async fn stop(&self) {
        let accept = self.accept.lock().ok().and_then(|mut a| a.take());
        if let Some(task) = accept {
            task.abort();
            let _ = task.await;
        }
        let open = self
            .connections
            .lock()
            .map(|mut open| std::mem::take(&mut *open))
            .unwrap_or_default();
        for task in open {
            task.abort();
            let _ = task.await;
        }
    }
}

/// Lets a request's handler reset the connection it came on.
#[derive(Clone)]
struct ConnectionReset(Arc<Notify>);

/// Serves one connection with HTTP/1.1 (over TLS when `tls` is given)
/// until it closes, or resets it (RST, not FIN) when a handler asks.
async fn connection(mut stream: TcpStream, router: Router, tls: Option<tokio_rustls::TlsAcceptor>) {
    // No Nagle: small last segments would otherwise wait on delayed ACKs.
    let _ = stream.set_nodelay(true);
    let reset_now = match tls {
        None => serve_http(&mut stream, router, false).await,
        // A client that refuses the certificate ends the handshake: nothing
        // to serve.
        Some(tls) => match tls.accept(&mut stream).await {
            Ok(session) => {
                let h2 = session.get_ref().1.alpn_protocol() == Some(b"h2");
                serve_http(session, router, h2).await
            }
            Err(_) => false,
        },
    };
    if reset_now {
        // Closing with a zero linger sends RST instead of FIN.
        let _ = stream.set_zero_linger();
    }
}

/// Serves HTTP/1.1 (or HTTP/2: `h2`) on `io` until it closes; true when a
/// handler asked for the connection to be reset.
async fn serve_http<S>(io: S, router: Router, h2: bool) -> bool
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    let reset = Arc::new(Notify::new());
    let handle = ConnectionReset(Arc::clone(&reset));
    let service = hyper::service::service_fn(move |mut request: Request<hyper::body::Incoming>| {
        request.extensions_mut().insert(handle.clone());
        router.clone().oneshot(request)
    });
    let served = if h2 {
        futures_util::future::Either::Left(
            hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(TokioIo::new(io), service),
        )
    } else {
        futures_util::future::Either::Right(
            hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(io), service),
        )
    };
    tokio::select! {
        _ = served => false,
        () = reset.notified() => true,
    }
}

fn header_num(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.parse().ok()
}

async fn stats(State(state): State<MockState>) -> Response {
    let body = serde_json::json!({"chat_requests": state.chat_requests.load(Ordering::SeqCst)});
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

const GARBAGE: &str = "<html><body><h1>502 Bad Gateway</h1>nginx</body></html>\n";

fn error_response(
    status: u16,
    retry_after_s: Option<u64>,
    retry_after_ms: Option<u64>,
) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::json!({"error": {"message": "mock upstream error", "type": "upstream_error", "param": null, "code": "mock_error"}});
    let mut response = (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response();
    if let Some(s) = retry_after_s {
        response.headers_mut().insert(header::RETRY_AFTER, s.into());
    }
    if let Some(ms) = retry_after_ms {
        response.headers_mut().insert("retry-after-ms", ms.into());
    }
    response
}

/// `x-mock-set-header`'s headers, added to whatever [`answer`] says.
async fn chat(state: State<MockState>, request: Request) -> Response {
    let extra: Vec<(header::HeaderName, header::HeaderValue)> = request
        .headers()
        .get_all("x-mock-set-header")
        .iter()
        .filter_map(|v| {
            let (name, value) = v.to_str().ok()?.split_once(':')?;
            Some((name.trim().parse().ok()?, value.trim().parse().ok()?))
        })
        .collect();
    let mut response = answer(state, request).await;
    for (name, value) in extra {
        response.headers_mut().append(name, value);
    }
    response
}

/// A provider's 401 (or `status`) that hands back the credentials it was
/// sent, with its session cookie and its own server's headers.
fn echo_auth(status: u16, headers: &HeaderMap) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::UNAUTHORIZED);
    let authorization = headers
        .get(header::AUTHORIZATION)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    let key = authorization.strip_prefix("Bearer ").unwrap_or_default();
    let body = serde_json::json!({"error": {
        "message": format!("Incorrect API key provided. We received `Authorization: {authorization}`."),
        "type": "invalid_request_error", "param": null, "code": "invalid_api_key",
        "received": {"api_key": key},
    }});
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::SET_COOKIE, "session=mock-session; Path=/; HttpOnly"),
            (header::SERVER, "mock-upstream/1.0"),
            (header::ALT_SVC, "h3=\":443\"; ma=86400"),
        ],
        body.to_string(),
    )
        .into_response()
}

async fn answer(State(state): State<MockState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let headers = parts.headers;
    let Ok(body) = axum::body::to_bytes(body, usize::MAX).await else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    state.chat_requests.fetch_add(1, Ordering::SeqCst);
    let in_flight = state.enter();
    let record = state.record.load(Ordering::Relaxed);
    if let (true, Ok(mut received)) = (record, state.received.lock()) {
        received.push(Received {
            version: parts.version,
            headers: headers.clone(),
            body: body.clone(),
            at: Instant::now(),
        });
    }
    let fault = state.next_fault();
    if let Some(ms) = header_num(&headers, "x-mock-delay-ms") {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    let request: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let stream = Stream {
        model: request["model"].as_str().unwrap_or("unknown").to_owned(),
        prompt_tokens: (body.len() / 4) as u64,
        chunks: header_num(&headers, "x-mock-chunks").unwrap_or(3) as usize,
        delay: Duration::from_millis(header_num(&headers, "x-mock-chunk-delay-ms").unwrap_or(0)),
        include_usage: headers.get("x-mock-no-usage").is_none()
            && request["stream_options"]["include_usage"].as_bool() == Some(true),
        usage: headers
            .get("x-mock-usage")
            .and_then(|v| serde_json::from_slice(v.as_bytes()).ok()),
        end: End::Done,
    };
    let cut = |chunks: usize, end: End| Stream {
        chunks,
        end,
        ..stream.clone()
    };
    match fault {
        Some(Fault::Status {
            status,
            retry_after_s,
            retry_after_ms,
        }) => return error_response(status, retry_after_s, retry_after_ms),
        Some(Fault::Reset) => {
            if let Some(reset) = parts.extensions.get::<ConnectionReset>() {
                reset.0.notify_one();
            }
            return std::future::pending().await;
        }
        Some(Fault::Hang) => return std::future::pending().await,
        Some(Fault::GarbageJson) => {
            return ([(header::CONTENT_TYPE, "application/json")], GARBAGE).into_response();
        }
        Some(Fault::GarbageSse) => {
            return ([(header::CONTENT_TYPE, "text/event-stream")], GARBAGE).into_response();
        }
        Some(Fault::TruncatedJson) => {
            return (
                [(header::CONTENT_TYPE, "application/json")],
                r#"{"id": "chatcmpl-mock", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hel"#,
            )
                .into_response();
        }
        Some(Fault::Huge(size)) => return huge(size, stream.prompt_tokens),
        Some(Fault::DieAfter(k)) => return cut(k, End::Die).respond(&state, in_flight),
        Some(Fault::DieBeforeDone(k)) => {
            return cut(k, End::DieBeforeDone).respond(&state, in_flight);
        }
        Some(Fault::StallAfter(k)) => return cut(k, End::Stall).respond(&state, in_flight),
        Some(Fault::EndWithoutDone(k)) => return cut(k, End::Vanish).respond(&state, in_flight),
        None => {}
    }

    if let Some(status) = header_num(&headers, "x-mock-echo-auth") {
        return echo_auth(status as u16, &headers);
    }
    if let Some(status) = header_num(&headers, "x-mock-status") {
        return error_response(status as u16, None, None);
    }
    if parts.uri.path().ends_with("/embeddings") {
        return embeddings(&request, &headers);
    }
    let plain = headers.get("x-mock-plain").is_some();
    if plain || request["stream"].as_bool() != Some(true) {
        let content = if headers.get("x-mock-echo").is_some() {
            String::from_utf8_lossy(&body).into_owned()
        } else {
            "Hello from the mock upstream.".to_owned()
        };
        let mut answer = serde_json::json!({
            "id": "chatcmpl-mock",
            "object": "chat.completion",
            "created": 1,
            "model": stream.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        });
        if headers.get("x-mock-content-parts").is_some() {
            answer["choices"][0]["message"]["content"] =
                serde_json::json!([{"type": "text", "text": content}]);
        }
        if headers.get("x-mock-no-usage").is_none() {
            let prompt_tokens = stream.prompt_tokens;
            answer["usage"] = stream.usage.clone().unwrap_or_else(|| serde_json::json!({"prompt_tokens": prompt_tokens, "completion_tokens": 7, "total_tokens": prompt_tokens + 7}));
        }
        let mut text = answer.to_string().into_bytes();
        if headers.get("x-mock-stray-byte").is_some()
            && let Some(at) = text.windows(5).position(|w| w == b"Hello")
        {
            text.insert(at + 3, 0xFF);
        }
        return ([(header::CONTENT_TYPE, "application/json")], text).into_response();
    }
    match header_num(&headers, "x-mock-die-after") {
        Some(k) => cut(k as usize, End::Die).respond(&state, in_flight),
        None => stream.respond(&state, in_flight),
    }
}

/// An embeddings answer: per input, `dimensions` (default 4) numbers made
/// from its position and length, as floats or, with `encoding_format:
/// "base64"`, as little-endian f32s in base64; usage a token per 4 bytes of
/// each input (at least 1), or `x-mock-usage`'s.
fn embeddings(request: &serde_json::Value, headers: &HeaderMap) -> Response {
    use base64::Engine as _;
    let inputs: Vec<String> = match &request["input"] {
        serde_json::Value::Array(items) if items.iter().all(|i| i.is_number()) => {
            vec![request["input"].to_string()]
        }
        serde_json::Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
            .collect(),
        other => vec![other.as_str().unwrap_or_default().to_owned()],
    };
    let dimensions = request["dimensions"].as_u64().unwrap_or(4) as usize;
    let base64 = request["encoding_format"] == "base64";
    let data: Vec<serde_json::Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            let vector: Vec<f32> = (0..dimensions)
                .map(|d| (index + 1) as f32 / 8.0 + d as f32 / 16.0 + input.len() as f32 / 1024.0)
                .collect();
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                serde_json::json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                serde_json::json!(vector)
            };
            serde_json::json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    let prompt_tokens: u64 = inputs
        .iter()
        .map(|i| (i.len() as u64).div_ceil(4).max(1))
        .sum();
    let mut answer = serde_json::json!({
        "object": "list",
        "data": data,
        "model": request["model"],
    });
    if headers.get("x-mock-no-usage").is_none() {
        answer["usage"] = headers
            .get("x-mock-usage")
            .and_then(|v| serde_json::from_slice(v.as_bytes()).ok())
            .unwrap_or_else(|| serde_json::json!({"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}));
    }
    (
        [(header::CONTENT_TYPE, "application/json")],
        answer.to_string(),
    )
        .into_response()
}

/// A completion whose content is `size` bytes of `a`, with its usage (one
/// completion token per 4 bytes) at the end, sent in 64 KiB chunks.
fn huge(size: usize, prompt_tokens: u64) -> Response {
    let completion = (size / 4) as u64;
    let mut body = br#"{"id":"chatcmpl-mock","object":"chat.completion","created":1,"model":"huge","choices":[{"index":0,"message":{"role":"assistant","content":""#.to_vec();
    body.resize(body.len() + size, b'a');
    body.extend_from_slice(
        format!(
            r#""}},"finish_reason":"length"}}],"usage":{{"prompt_tokens":{prompt_tokens},"completion_tokens":{completion},"total_tokens":{}}}}}"#,
            prompt_tokens + completion
        )
        .as_bytes(),
    );
    let body = Bytes::from(body);
    let chunks: Vec<Bytes> = (0..body.len())
        .step_by(64 * 1024)
        .map(|at| body.slice(at..body.len().min(at + 64 * 1024)))
        .collect();
    let body = futures_util::stream::iter(chunks.into_iter().map(Ok::<_, std::io::Error>));
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// How a streamed answer ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// A finish chunk, the usage chunk when asked for, `[DONE]`.
    Done,
    /// The connection dies.
    Die,
    /// The finish (and usage) chunks, then the connection dies.
    DieBeforeDone,
    /// Silence until the reader goes away.
    Stall,
    /// The body ends with no finish and no `[DONE]`.
    Vanish,
}

/// A streamed answer: the role chunk, `chunks` content chunks
/// (`word0 `, `word1 `, ...), then its `end`.
#[derive(Debug, Clone)]
struct Stream {
    model: String,
    prompt_tokens: u64,
    chunks: usize,
    delay: Duration,
    include_usage: bool,
    /// `x-mock-usage`'s object, reported instead of the counted usage.
    usage: Option<serde_json::Value>,
    end: End,
}

impl Stream {
    fn respond(self, state: &MockState, in_flight: InFlight) -> Response {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
        let cancelled = Arc::clone(&state.cancelled_streams);
        tokio::spawn(async move {
            let _in_flight = in_flight;
            let mut reader_left = false;
            for (i, item) in self.events().into_iter().enumerate() {
                if i > 0 && !self.delay.is_zero() {
                    tokio::time::sleep(self.delay).await;
                }
                if tx.send(item).await.is_err() {
                    reader_left = true;
                    break;
                }
            }
            if matches!(self.end, End::Die | End::DieBeforeDone) && !reader_left {
                // A moment for what was sent to reach the wire: a body error
                // drops the connection with whatever is still buffered.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let _ = tx
                    .send(Err(std::io::Error::other("the mock upstream died")))
                    .await;
            }
            if self.end == End::Stall && !reader_left {
                tx.closed().await;
                reader_left = true;
            }
            if let (true, Ok(mut n)) = (reader_left, cancelled.lock()) {
                *n += 1;
            }
        });
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header("x-ratelimit-remaining-tokens", "999")
            .body(Body::from_stream(stream))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
    }

    /// The events before the end: every one for [`End::Done`], else the
    /// role chunk and the content chunks only.
    fn events(&self) -> Vec<Result<Bytes, std::io::Error>> {
        let model = &self.model;
        let event = |value: serde_json::Value| Ok(Bytes::from(format!("data: {value}\n\n")));
        let chunk = |delta: serde_json::Value, finish: Option<&str>| {
            serde_json::json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        };
        let mut sent = vec![event(chunk(
            serde_json::json!({"role": "assistant", "content": ""}),
            None,
        ))];
        for i in 0..self.chunks {
            sent.push(event(chunk(
                serde_json::json!({"content": format!("word{i} ")}),
                None,
            )));
        }
        if !matches!(self.end, End::Done | End::DieBeforeDone) {
            return sent;
        }
        sent.push(event(chunk(serde_json::json!({}), Some("stop"))));
        if self.include_usage {
            let (prompt, completion) = (self.prompt_tokens, self.chunks as u64);
            let usage = self.usage.clone().unwrap_or_else(|| serde_json::json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}));
            sent.push(event(serde_json::json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1, "model": model,
                "choices": [], "usage": usage})));
        }
        if self.end == End::Done {
            sent.push(Ok(Bytes::from_static(b"data: [DONE]\n\n")));
        }
        sent
    }
}
