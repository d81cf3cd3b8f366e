//! The request log: one line and the request metrics for every request,
//! written once its response head is ready. Runs inside the trace span that
//! carries the request id, and reads what the handler learned (client,
//! model, upstream, estimate) from the response's extensions.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tower_http::request_id::{MakeRequestId, RequestId};

use crate::client_addr::ClientAddr;
use crate::error::ErrorCode;
use crate::facts::RequestFacts;

/// Where authentication records the client's name for the log line, on
/// every route (set by [`crate::endpoints::Authenticated`]).
#[derive(Clone, Default)]
pub struct ClientSlot(Arc<OnceLock<Arc<str>>>);

impl ClientSlot {
    pub fn set(&self, name: Arc<str>) {
        let _ = self.0.set(name);
    }
}

/// What a chat completion learned, left on its response for this log.
#[derive(Clone)]
pub struct RequestLog(pub Arc<RequestFacts>);

pub async fn access_log(mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let client_slot = ClientSlot::default();
    request.extensions_mut().insert(client_slot.clone());
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let request_id = request
        .extensions()
        .get::<RequestId>()
        .and_then(|id| id.header_value().to_str().ok())
        .unwrap_or("")
        .to_owned();
    let client_addr = ClientAddr::of(request.extensions());

    let response = next.run(request).await;

    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    let facts = response
        .extensions()
        .get::<RequestLog>()
        .map(|log| Arc::clone(&log.0));
    let facts = facts.as_deref();
    let code = response.extensions().get::<ErrorCode>().map(|c| c.as_str());
    let client = client_slot.0.get().map_or("", |name| &**name);
    let model = facts.and_then(|f| f.model.as_deref()).unwrap_or("");
    let upstream = facts.and_then(|f| f.upstream.as_deref());
    let upstream_latency = facts.and_then(|f| f.upstream_latency);
    crate::traces::record_response(
        status,
        code,
        client,
        facts.map_or(0, |f| f.attempts),
        upstream,
    );
    crate::metrics::REQUESTS
        .counter(&[
            ("route", &route),
            ("model", model),
            ("client", client),
            ("status", &status.to_string()),
        ])
        .increment(1);
    crate::metrics::REQUEST_DURATION
        .histogram(&[("route", &route)])
        .record(elapsed.as_secs_f64());
    if let (Some(upstream), Some(latency)) = (upstream, upstream_latency) {
        crate::metrics::UPSTREAM_DURATION
            .histogram(&[("upstream", upstream)])
            .record(latency.as_secs_f64());
    }
    tracing::info!(
        request_id,
        method = %method,
        route = %route,
        status,
        code,
        client,
        %client_addr,
        model,
        upstream_ms = upstream_latency.map(|d| d.as_secs_f64() * 1000.0),
        estimated_tokens = facts.and_then(|f| f.estimated_tokens),
        total_ms = elapsed.as_secs_f64() * 1000.0,
        "request"
    );
    response
}

/// Request ids: the client's `x-request-id` when acceptable (see
/// [`drop_unacceptable_request_id`]), else a process-unique one: a random
/// prefix chosen at startup and a counter.
#[derive(Clone, Copy, Default)]
pub struct NewRequestId;

impl MakeRequestId for NewRequestId {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        static PREFIX: OnceLock<String> = OnceLock::new();
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let prefix = PREFIX.get_or_init(|| {
            let mut bytes = [0u8; 6];
            let _ = getrandom::fill(&mut bytes);
            hex::encode(bytes)
        });
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        HeaderValue::from_str(&format!("req_{prefix}{n:010x}"))
            .ok()
            .map(RequestId::new)
    }
}

/// A client's request id is kept only if it is short printable ASCII: it
/// goes into logs and upstream headers. Others are dropped, so a new one is
/// made.
pub async fn drop_unacceptable_request_id(mut request: Request) -> Request {
    let acceptable = |value: &HeaderValue| {
        let bytes = value.as_bytes();
        !bytes.is_empty() && bytes.len() <= 128 && bytes.iter().all(u8::is_ascii_graphic)
    };
    let headers = request.headers_mut();
    if headers.get(REQUEST_ID).is_some_and(|v| !acceptable(v)) {
        headers.remove(REQUEST_ID);
    }
    request
}

pub const REQUEST_ID: &str = "x-request-id";
