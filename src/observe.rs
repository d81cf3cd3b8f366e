//! The outermost middleware: gives every request an id, and writes the one
//! log line and the metrics for it once its response head is ready.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use std::panic::AssertUnwindSafe;

use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::IntoResponse;
use axum::response::Response;
use futures_util::FutureExt;

use crate::error::{ApiError, ErrorCode};

pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The request's id, as a request extension for handlers that forward it.
#[derive(Clone)]
pub struct RequestId(pub HeaderValue);

/// Where authentication records the client's name for the log line, on every
/// route (set by [`crate::routes::Authenticated`]).
#[derive(Clone, Default)]
pub struct ClientSlot(Arc<std::sync::OnceLock<Arc<str>>>);

impl ClientSlot {
    pub fn set(&self, name: Arc<str>) {
        let _ = self.0.set(name);
    }
}

/// What a handler learned about a request, left on the response for the log
/// line and the metrics.
#[derive(Clone, Default)]
pub struct RequestLog {
    pub client: Option<Arc<str>>,
    pub model: Option<String>,
    pub upstream: Option<String>,
    pub upstream_latency: Option<Duration>,
    /// Tokens reserved for the request (prompt estimate + completion cap),
    /// also set when the budget refused it. What it finally cost is logged
    /// as `usage settled` when its body ends.
    pub estimated_tokens: Option<u64>,
}

pub async fn observe(mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = request
        .headers()
        .get(&REQUEST_ID)
        .filter(|v| acceptable_id(v))
        .cloned()
        .unwrap_or_else(new_request_id);
    request.extensions_mut().insert(RequestId(id.clone()));
    let client_slot = ClientSlot::default();
    request.extensions_mut().insert(client_slot.clone());
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());

    // A bug that panics in one request answers that request with a 500 and
    // leaves every other request alone.
    let mut response = match AssertUnwindSafe(next.run(request)).catch_unwind().await {
        Ok(response) => response,
        Err(_) => {
            tracing::error!(
                request_id = id.to_str().unwrap_or(""),
                "request handler panicked"
            );
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "The gateway failed to handle this request.",
            )
            .into_response()
        }
    };

    let elapsed = started.elapsed();
    response
        .headers_mut()
        .insert(REQUEST_ID.clone(), id.clone());
    let status = response.status().as_u16();
    let log = response
        .extensions()
        .get::<RequestLog>()
        .cloned()
        .unwrap_or_default();
    let code = response.extensions().get::<ErrorCode>().map(|c| c.0);

    let client = log
        .client
        .as_deref()
        .or(client_slot.0.get().map(|name| &**name))
        .unwrap_or("");
    let model = log.model.as_deref().unwrap_or("");
    metrics::counter!(
        "iris_requests_total",
        "route" => route.clone(),
        "model" => model.to_owned(),
        "client" => client.to_owned(),
        "status" => status.to_string()
    )
    .increment(1);
    metrics::histogram!("iris_request_duration_seconds", "route" => route.clone())
        .record(elapsed.as_secs_f64());
    if let (Some(upstream), Some(latency)) = (&log.upstream, log.upstream_latency) {
        metrics::histogram!("iris_upstream_duration_seconds", "upstream" => upstream.clone())
            .record(latency.as_secs_f64());
    }

    tracing::info!(
        request_id = id.to_str().unwrap_or(""),
        method = %method,
        route = %route,
        status,
        code,
        client,
        model,
        upstream_ms = log.upstream_latency.map(|d| d.as_secs_f64() * 1000.0),
        estimated_tokens = log.estimated_tokens,
        total_ms = elapsed.as_secs_f64() * 1000.0,
        "request"
    );
    response
}

/// A client's id is kept if it is short printable ASCII: it goes into logs
/// and upstream headers.
fn acceptable_id(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty() && bytes.len() <= 128 && bytes.iter().all(|b| b.is_ascii_graphic())
}

/// A process-unique id: a random prefix chosen at startup and a counter.
fn new_request_id() -> HeaderValue {
    static PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(|| {
        let mut bytes = [0u8; 6];
        let _ = getrandom::fill(&mut bytes);
        hex::encode(bytes)
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    HeaderValue::from_str(&format!("req_{prefix}{n:010x}"))
        .unwrap_or(HeaderValue::from_static("req_0"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::routing::get;
    use tower::ServiceExt;

    async fn boom() -> &'static str {
        panic!("a bug")
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_500_in_openai_shape() {
        let app = Router::new()
            .route("/boom", get(boom))
            .layer(axum::middleware::from_fn(observe));
        let request = Request::get("/boom")
            .body(axum::body::Body::empty())
            .expect("request");
        let response = app.oneshot(request).await.expect("infallible");
        assert_eq!(response.status(), 500);
        assert!(response.headers().contains_key("x-request-id"));
        assert_eq!(
            response.extensions().get::<ErrorCode>().map(|c| c.0),
            Some("internal_error")
        );
    }
}
