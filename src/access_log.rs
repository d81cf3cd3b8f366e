//! The request log: one line and the request metrics for every request,
//! written once its response head is ready. Runs inside the trace span that
//! carries the request id, and reads what the handler learned (client,
//! model, upstream, estimate) from the response's extensions.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method};
use axum::response::Response;

use crate::error::ErrorCode;
use crate::facts::RequestFacts;
use crate::ids::Ids;
use crate::stamp::{ClientSlot, Stamp};

/// What a chat completion learned, left on its response for this log.
#[derive(Clone)]
pub struct RequestLog(pub Arc<RequestFacts>);

/// The route a request was taken to, for its log line, metrics and span.
#[derive(Clone)]
pub enum Route {
    /// The one the router matched.
    Matched(MatchedPath),
    /// One the server takes past the router ([`crate::app::App`]).
    Direct(&'static str),
}

impl Route {
    pub fn as_str(&self) -> &str {
        match self {
            Self::Matched(path) => path.as_str(),
            Self::Direct(path) => path,
        }
    }
}

/// What the log line needs of a request, taken before it is handled.
pub struct Started {
    at: Instant,
    method: Method,
    route: Option<Route>,
    request_id: HeaderValue,
    client_addr: std::net::IpAddr,
    client: ClientSlot,
}

impl Started {
    /// Takes what the line needs of `request`, taken to `route`, and of
    /// the `stamp` the edge gives it (with the slot authentication names
    /// the client in).
    pub fn on(request: &Request, route: Option<Route>, stamp: &Stamp) -> Self {
        Self {
            at: Instant::now(),
            method: request.method().clone(),
            route,
            request_id: stamp.request_id.clone(),
            client_addr: stamp.client_addr,
            client: stamp.client.clone(),
        }
    }

    /// Writes the line and the request metrics for `response`, the final
    /// one (errors of the edge included).
    pub fn finish(self, response: &Response) {
        let elapsed = self.at.elapsed();
        let route = self.route.as_ref().map_or("unmatched", Route::as_str);
        let request_id = self.request_id.to_str().unwrap_or("");
        let status = response.status().as_u16();
        let facts = response.extensions().get::<RequestLog>().map(|log| &log.0);
        let facts = facts.map(|facts| &**facts);
        let code = response.extensions().get::<ErrorCode>().map(|c| c.as_str());
        let client = self.client.get().map_or("", |name| &**name);
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
                ("route", route),
                ("model", model),
                ("client", client),
                ("status", status_label(status)),
            ])
            .increment(1);
        crate::metrics::REQUEST_DURATION
            .histogram(&[("route", route)])
            .record(elapsed.as_secs_f64());
        if let (Some(upstream), Some(latency)) = (upstream, upstream_latency) {
            crate::metrics::UPSTREAM_DURATION
                .histogram(&[("upstream", upstream)])
                .record(latency.as_secs_f64());
        }
        tracing::info!(
            request_id,
            method = %self.method,
            route,
            status,
            code,
            client,
            client_addr = %self.client_addr,
            model,
            upstream_ms = upstream_latency.map(|d| d.as_secs_f64() * 1000.0),
            estimated_tokens = facts.and_then(|f| f.estimated_tokens),
            total_ms = elapsed.as_secs_f64() * 1000.0,
            "request"
        );
    }
}

/// A status code as a metric label, formatted once per process rather than
/// per request.
fn status_label(status: u16) -> &'static str {
    static LABELS: OnceLock<Vec<String>> = OnceLock::new();
    let labels = LABELS.get_or_init(|| (0..1000).map(|code| code.to_string()).collect());
    labels
        .get(usize::from(status))
        .map_or("other", String::as_str)
}

/// The request's id: the client's `x-request-id` when acceptable (short
/// printable ASCII: it goes into logs and upstream headers), else a
/// process-unique one, a random prefix chosen at startup and a counter,
/// put in `headers` in place of the client's.
pub fn request_id_for(headers: &mut HeaderMap) -> HeaderValue {
    let acceptable = |value: &HeaderValue| {
        let bytes = value.as_bytes();
        !bytes.is_empty() && bytes.len() <= 128 && bytes.iter().all(u8::is_ascii_graphic)
    };
    if let Some(id) = headers.get(REQUEST_ID).filter(|v| acceptable(v)) {
        return id.clone();
    }
    let id = new_request_id();
    headers.insert(REQUEST_ID, id.clone());
    id
}

fn new_request_id() -> HeaderValue {
    static IDS: Ids = Ids::new("req_", 6, 10);
    // Hex digits and an underscore: always a valid header value.
    HeaderValue::try_from(IDS.next()).unwrap_or(HeaderValue::from_static("req_"))
}

/// A name, not a `&str`: a `&str` is parsed as a header name at every use.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
