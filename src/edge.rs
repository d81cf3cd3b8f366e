//! What every request meets before its route and every response after it,
//! in one service and one future: the client's address, the request id,
//! the request's span, the body's limit and deadline, a guard against a
//! panicking handler, the log line and metrics, and the headers every
//! answer carries.
//!
//! This was a stack of eleven tower and axum layers, each with its own
//! future (most of them boxed), clone and body wrapper per request; they
//! only added bookkeeping around the route, so they are one step here.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::FutureExt;
use http_body::{Frame, SizeHint};
use http_body_util::Limited;
use tower::{Layer, Service};
use tracing::{Instrument, Span};

use crate::access_log::{self, Route};
use crate::body_deadline::DeadlineBody;
use crate::client_addr;
use crate::error::{ApiError, ErrorCode, Relayed};
use crate::stamp::{ClientSlot, Stamp};

/// What the edge needs of the config (`[server]`, which a reload does not
/// change).
#[derive(Debug, Clone)]
pub struct Edge {
    pub max_body_bytes: usize,
    pub body_read_timeout: Duration,
    pub trusted_proxies: Arc<[ipnet::IpNet]>,
}

/// Puts a router (or any service of axum requests) behind the [`Edge`].
#[derive(Clone)]
pub struct EdgeLayer(Arc<Edge>);

impl EdgeLayer {
    pub fn new(edge: Edge) -> Self {
        Self(Arc::new(edge))
    }
}

impl<S> Layer<S> for EdgeLayer {
    type Service = EdgeService<S>;

    fn layer(&self, inner: S) -> EdgeService<S> {
        EdgeService {
            inner,
            edge: Arc::clone(&self.0),
        }
    }
}

#[derive(Clone)]
pub struct EdgeService<S> {
    inner: S,
    edge: Arc<Edge>,
}

impl<S> Service<Request> for EdgeService<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        // The clone answers the next call; the one made ready answers this.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let route = request.extensions().get::<MatchedPath>().cloned();
        let handled = self.edge.serve(
            request,
            route.map(Route::Matched),
            move |request| async move {
                match inner.call(request).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                }
            },
        );
        Box::pin(async move { Ok(handled.await) })
    }
}

impl Edge {
    /// `request` through the edge to `handler`, the one of `route`.
    pub fn serve<H, F>(
        self: &Arc<Self>,
        mut request: Request,
        route: Option<Route>,
        handler: H,
    ) -> impl Future<Output = Response> + Send + use<H, F>
    where
        H: FnOnce(Request) -> F + Send + 'static,
        F: Future<Output = Response> + Send,
    {
        let edge = Arc::clone(self);

        // The client's address, once: the peer, or behind a trusted proxy
        // what it forwarded (the throttle, allowed_networks, the log line
        // and the spend record all read this one).
        let peer = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::from([0, 0, 0, 0]), |info| info.0.ip());
        let addr = client_addr::resolve(peer, request.headers(), &edge.trusted_proxies);
        // The request id: the client's if acceptable, else a new one.
        let id = access_log::request_id_for(request.headers_mut());
        let stamp = Stamp {
            client_addr: addr,
            request_id: id.clone(),
            client: ClientSlot::default(),
        };
        // A span per request, so every log line of it names the request.
        let span = request_span(&request, route.as_ref().map(Route::as_str), &id);
        let admin = is_admin_path(request.uri().path());
        let log = access_log::Started::on(&request, route, &stamp);
        request.extensions_mut().insert(stamp);

        let handled = async move {
            let limit = edge.max_body_bytes;
            let response = if declares_more_than(&request, limit) {
                // At once, before any of the body is read.
                ApiError::request_too_large(limit).into_response()
            } else {
                // Bodies over the limit fail the handler's read as they
                // stream in (413), and so does a body not arrived by its
                // deadline, counted from now, just after the headers were
                // read (408). Deadlines on headers and idle connections
                // are the server's.
                let timeout = edge.body_read_timeout;
                let request = request
                    .map(|body| Body::new(Limited::new(DeadlineBody::new(body, timeout), limit)));
                // A handler that panics answers 500, and only its own request.
                match AssertUnwindSafe(async move { handler(request).await })
                    .catch_unwind()
                    .await
                {
                    Ok(response) => response,
                    Err(_) => {
                        tracing::error!("request handler panicked");
                        ApiError::internal().into_response()
                    }
                }
            };
            let mut response = openai_shaped_413(response, limit);
            log.finish(&response);
            if response.status().is_server_error() {
                // For operators alerting on errors (as tower-http's trace
                // layer, which this replaces, logged them).
                tracing::error!(status = response.status().as_u16(), "response failed");
            }

            // Every answer carries this request's id, in place of any an
            // upstream's answer brought (OpenAI's own carry one), and
            // `nosniff` (it is only ever its declared type); under /admin,
            // `no-store` (keys, usage) unless the route set its own.
            let headers = response.headers_mut();
            headers.insert(access_log::REQUEST_ID, id);
            headers.insert(
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            );
            if admin {
                headers
                    .entry(header::CACHE_CONTROL)
                    .or_insert(HeaderValue::from_static("no-store"));
            }
            in_span(response)
        };
        handled.instrument(span)
    }
}

/// Whether `path` is under `/admin`, whose answers no cache may keep.
pub fn is_admin_path(path: &str) -> bool {
    path == "/admin" || path.starts_with("/admin/")
}

fn request_span(request: &Request, route: Option<&str>, id: &HeaderValue) -> Span {
    let id = id.to_str().unwrap_or("");
    if crate::traces::enabled() {
        return crate::traces::request_span(request, route, id);
    }
    tracing::info_span!("request", request_id = id)
}

/// Whether the request's `Content-Length` is over `limit`.
fn declares_more_than(request: &Request, limit: usize) -> bool {
    request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .is_some_and(|length| length > limit as u64)
}

/// A 413 that is not Iris's own or relayed (an extractor's, in plain text)
/// is answered in OpenAI's shape, like every error.
fn openai_shaped_413(response: Response, limit: usize) -> Response {
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE
        && response.extensions().get::<ErrorCode>().is_none()
        && response.extensions().get::<Relayed>().is_none()
    {
        return ApiError::request_too_large(limit).into_response();
    }
    response
}

/// The response, its body polled inside the request's span (a streamed
/// answer settles, and may log, as its body ends), unless no subscriber
/// takes the span.
fn in_span(response: Response) -> Response {
    let span = Span::current();
    if span.is_disabled() {
        return response;
    }
    response.map(|body| Body::new(InSpan { body, span }))
}

struct InSpan {
    body: Body,
    span: Span,
}

impl http_body::Body for InSpan {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        let _entered = this.span.enter();
        Pin::new(&mut this.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::routing::{get, post};
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;

    /// Routes that echo the request id the handler was given and count
    /// the calls that reached them, behind the edge.
    fn app(reached: Arc<std::sync::atomic::AtomicUsize>) -> Router {
        let routes = Router::new()
            .route(
                "/id",
                get(
                    |axum::Extension(stamp): axum::Extension<Stamp>| async move {
                        stamp.request_id.to_str().unwrap_or("").to_owned()
                    },
                ),
            )
            .route("/admin/x", get(|| async { "keys" }))
            .route(
                "/upload",
                post(move |_: Bytes| async move {
                    reached.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    "read"
                }),
            );
        routes.layer(EdgeLayer::new(Edge {
            max_body_bytes: 16,
            body_read_timeout: Duration::from_secs(5),
            trusted_proxies: Vec::new().into(),
        }))
    }

    async fn send(app: &Router, request: axum::http::Request<Body>) -> (Response, String) {
        let response = app.clone().oneshot(request).await.expect("infallible");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        let text = String::from_utf8_lossy(&body).into_owned();
        (Response::from_parts(parts, Body::empty()), text)
    }

    fn get_id(id: Option<&str>) -> axum::http::Request<Body> {
        let mut request = axum::http::Request::get("/id");
        if let Some(id) = id {
            request = request.header(access_log::REQUEST_ID, id);
        }
        request.body(Body::empty()).expect("request")
    }

    #[tokio::test]
    async fn a_clients_request_id_is_kept_only_when_short_printable_ascii() {
        let app = app(Arc::default());
        let (response, seen) = send(&app, get_id(Some("client-id-1"))).await;
        assert_eq!(seen, "client-id-1");
        assert_eq!(response.headers()[access_log::REQUEST_ID], "client-id-1");

        let long = "x".repeat(129);
        for unacceptable in ["has space", long.as_str()] {
            let (response, seen) = send(&app, get_id(Some(unacceptable))).await;
            assert!(seen.starts_with("req_"), "{unacceptable}: {seen}");
            assert_eq!(response.headers()[access_log::REQUEST_ID], seen.as_str());
        }
        let (first, _) = send(&app, get_id(None)).await;
        let (second, _) = send(&app, get_id(None)).await;
        assert_ne!(
            first.headers()[access_log::REQUEST_ID],
            second.headers()[access_log::REQUEST_ID]
        );
        assert_eq!(first.headers()["x-content-type-options"], "nosniff");
        assert!(first.headers().get(header::CACHE_CONTROL).is_none());
    }

    #[tokio::test]
    async fn admin_answers_are_not_stored() {
        let app = app(Arc::default());
        let request = axum::http::Request::get("/admin/x")
            .body(Body::empty())
            .expect("request");
        let (response, _) = send(&app, request).await;
        assert_eq!(response.headers()[header::CACHE_CONTROL], "no-store");
    }

    /// Over the limit by `Content-Length`: refused before the handler; by
    /// what arrives: the handler's read fails, and the extractor's plain
    /// 413 is answered in OpenAI's shape.
    #[tokio::test]
    async fn bodies_over_the_limit_are_413_in_openai_shape() {
        let reached = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let app = app(Arc::clone(&reached));
        let declared = axum::http::Request::post("/upload")
            .header(header::CONTENT_LENGTH, "17")
            .body(Body::from("x".repeat(17)))
            .expect("request");
        let streamed = axum::http::Request::post("/upload")
            .body(Body::from_stream(futures_util::stream::iter([
                Ok::<_, Infallible>(Bytes::from("x".repeat(10))),
                Ok(Bytes::from("x".repeat(10))),
            ])))
            .expect("request");
        for request in [declared, streamed] {
            let (response, body) = send(&app, request).await;
            assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
            let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
            assert_eq!(json["error"]["code"], "request_too_large", "{json}");
        }
        assert_eq!(reached.load(std::sync::atomic::Ordering::Relaxed), 0);
        let fits = axum::http::Request::post("/upload")
            .body(Body::from("x".repeat(16)))
            .expect("request");
        let (response, body) = send(&app, fits).await;
        assert_eq!((response.status(), body.as_str()), (StatusCode::OK, "read"));
    }
}
