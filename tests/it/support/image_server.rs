//! A test image host on a loopback address of the test's choosing (usually
//! 127.0.0.2): serves files the test registers, redirect chains and loops,
//! slow, oversized, compressed and erroring bodies, and records every request
//! and the peak number served at once.
//!
//! Routes (every one takes `?delay_ms=N` before the response head):
//! - `/files/{name}`: a registered file with its registered content type;
//! - `/chain/{n}/{name}`: `n` redirects, then the file;
//! - `/loop`: redirects to itself;
//! - `/redirect?to=URL[&status=N]`: one redirect to `URL` (302, or status `N`);
//! - `/chunked/{len}`: `len` bytes (a PNG signature, then zeros) with no `Content-Length`;
//! - `/slow/{name}?chunk_ms=N&chunk_bytes=B`: the file B bytes (1 KiB) at a time, N ms apart;
//! - `/gzip/{name}`: the file labelled `Content-Encoding: gzip`;
//! - `/status/{code}`: that status.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Path, Query};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;

type Params = Query<HashMap<String, String>>;

#[derive(Clone, Default)]
struct ServerState {
    files: Arc<Mutex<HashMap<String, (String, Bytes)>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    in_flight: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

/// One request as the image host received it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Path and query.
    pub uri: String,
    pub headers: HeaderMap,
}

/// Counts a request in flight for as long as it lives.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ServerState {
    async fn enter(
        &self,
        uri: &Uri,
        headers: &HeaderMap,
        params: &HashMap<String, String>,
    ) -> InFlight {
        if let Ok(mut seen) = self.seen.lock() {
            seen.push(Seen {
                uri: uri.to_string(),
                headers: headers.clone(),
            });
        }
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        let guard = InFlight(Arc::clone(&self.in_flight));
        if let Some(ms) = params.get("delay_ms").and_then(|v| v.parse().ok()) {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        guard
    }

    fn file(&self, name: &str) -> Option<(String, Bytes)> {
        self.files.lock().ok()?.get(name).cloned()
    }
}

/// A request being served: recorded, counted in flight for as long as this
/// lives, and already past its `?delay_ms`. Every route takes one.
struct Hit {
    state: ServerState,
    params: HashMap<String, String>,
    uri: Uri,
    in_flight: InFlight,
}

impl FromRequestParts<ServerState> for Hit {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &ServerState,
    ) -> Result<Self, Self::Rejection> {
        let Query(params) = Params::try_from_uri(&parts.uri).unwrap_or(Query(HashMap::new()));
        let in_flight = state.enter(&parts.uri, &parts.headers, &params).await;
        Ok(Self {
            state: state.clone(),
            params,
            uri: parts.uri.clone(),
            in_flight,
        })
    }
}

pub struct ImageServer {
    pub addr: SocketAddr,
    state: ServerState,
}

impl ImageServer {
    /// Starts on `ip:0`.
    pub async fn start(ip: &str) -> Self {
        let listener = TcpListener::bind((ip, 0))
            .await
            .unwrap_or_else(|e| panic!("image server on {ip}: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("addr: {e}"));
        let state = ServerState::default();
        let app = Router::new()
            .route("/files/{name}", get(file))
            .route("/chain/{n}/{name}", get(chain))
            .route("/loop", get(redirect_loop))
            .route("/redirect", get(redirect))
            .route("/chunked/{len}", get(chunked))
            .route("/slow/{name}", get(slow))
            .route("/gzip/{name}", get(gzip))
            .route("/status/{code}", get(status))
            .with_state(state.clone());
        // No Nagle: small last segments would otherwise wait on delayed ACKs.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, state }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Registers `/files/{name}`, served with `content_type`.
    pub fn add(&self, name: &str, content_type: &str, bytes: impl Into<Bytes>) {
        if let Ok(mut files) = self.state.files.lock() {
            files.insert(name.to_owned(), (content_type.to_owned(), bytes.into()));
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state
            .seen
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Requests whose path starts with `prefix`.
    pub fn hits(&self, prefix: &str) -> usize {
        self.seen()
            .iter()
            .filter(|s| s.uri.starts_with(prefix))
            .count()
    }

    /// The most requests ever served at once.
    pub fn peak(&self) -> usize {
        self.state.peak.load(Ordering::SeqCst)
    }
}

fn found(location: &str) -> Response {
    (StatusCode::FOUND, [(header::LOCATION, location.to_owned())]).into_response()
}

fn serve_file(state: &ServerState, name: &str) -> Response {
    match state.file(name) {
        Some((content_type, bytes)) => {
            ([(header::CONTENT_TYPE, content_type)], bytes).into_response()
        }
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn file(Path(name): Path<String>, hit: Hit) -> Response {
    serve_file(&hit.state, &name)
}

async fn chain(Path((n, name)): Path<(u32, String)>, hit: Hit) -> Response {
    if n == 0 {
        return serve_file(&hit.state, &name);
    }
    let query = hit.uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    found(&format!("/chain/{}/{name}{query}", n - 1))
}

async fn redirect_loop(_hit: Hit) -> Response {
    found("/loop")
}

async fn redirect(hit: Hit) -> Response {
    let status = hit
        .params
        .get("status")
        .and_then(|s| s.parse().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::FOUND);
    match hit.params.get("to") {
        Some(to) => (status, [(header::LOCATION, to.to_owned())]).into_response(),
        None => StatusCode::BAD_REQUEST.into_response(),
    }
}

async fn chunked(Path(len): Path<usize>, hit: Hit) -> Response {
    let guard = hit.in_flight;
    let mut first = b"\x89PNG\r\n\x1a\n".to_vec();
    first.resize(len.min(64 * 1024), 0);
    let rest = len.saturating_sub(first.len());
    let chunks = std::iter::once(Bytes::from(first)).chain(
        (0..rest.div_ceil(64 * 1024))
            .map(move |i| Bytes::from(vec![0u8; (rest - i * 64 * 1024).min(64 * 1024)])),
    );
    let stream = futures_util::stream::iter(chunks.map(move |c| {
        let _ = &guard;
        Ok::<_, std::io::Error>(c)
    }));
    (
        [(header::CONTENT_TYPE, "image/png")],
        Body::from_stream(stream),
    )
        .into_response()
}

async fn slow(Path(name): Path<String>, hit: Hit) -> Response {
    let Some((content_type, bytes)) = hit.state.file(&name) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let number = |name: &str, default: u64| {
        hit.params
            .get(name)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let pause = Duration::from_millis(number("chunk_ms", 100));
    let chunk = number("chunk_bytes", 1024) as usize;
    let stream =
        futures_util::stream::unfold((bytes, hit.in_flight), move |(rest, guard)| async move {
            if rest.is_empty() {
                return None;
            }
            tokio::time::sleep(pause).await;
            let take = rest.len().min(chunk);
            let chunk = rest.slice(..take);
            Some((Ok::<_, std::io::Error>(chunk), (rest.slice(take..), guard)))
        });
    (
        [(header::CONTENT_TYPE, content_type)],
        Body::from_stream(stream),
    )
        .into_response()
}

async fn gzip(Path(name): Path<String>, hit: Hit) -> Response {
    let mut response = serve_file(&hit.state, &name);
    response.headers_mut().insert(
        header::CONTENT_ENCODING,
        header::HeaderValue::from_static("gzip"),
    );
    response
}

async fn status(Path(code): Path<u16>, _hit: Hit) -> Response {
    StatusCode::from_u16(code)
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
        .into_response()
}

/// A raw TCP server on `ip:0` that answers every connection with exactly
/// `response` (head and body as given, however they lie), then either closes
/// or holds the connection open. Counts connections.
pub async fn raw_server(
    ip: &str,
    response: Vec<u8>,
    hold_open: bool,
) -> (SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind((ip, 0))
        .await
        .unwrap_or_else(|e| panic!("raw server on {ip}: {e}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("addr: {e}"));
    let connections = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&connections);
    let response = Arc::new(response);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let response = Arc::clone(&response);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let _ = socket.read(&mut buf).await;
                let _ = socket.write_all(&response).await;
                if hold_open {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
            });
        }
    });
    (addr, connections)
}
