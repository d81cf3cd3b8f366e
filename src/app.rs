//! The one place the router and its layer stack are built, over the
//! application's state ([`crate::state`]), and the [`App`] the server's
//! connections hand their requests to.

use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use axum::http::Method;
use axum::response::Response;
use axum::routing::{any, get, post};
use tower::ServiceExt;

use crate::access_log::Route;
use crate::edge::{Edge, EdgeLayer};
use crate::endpoints;
use crate::openai::Api;
pub use crate::state::{AppState, SharedState};

/// What the server's connections serve: the router, and beside it the
/// path nearly every request takes, a `POST` to the chat completions (or
/// embeddings) API, taken straight to its handler through the same edge.
///
/// The router's way there costs a path match, its URL parameters, and a
/// boxed service and boxed future at each of two levels (the route, and
/// the handler behind the edge layer): 5,100 instructions of a request's
/// 116,000 (docs/performance.md). The router still lists those routes, for
/// their other methods (a 405 with `Allow`) and for tests that call it
/// alone.
pub struct App {
    router: Router,
    /// The API routes' way past the router; `None` serves all by the router.
    direct: Option<(Arc<Edge>, SharedState)>,
}

impl App {
    /// `router` alone, for tests of the server's connections.
    #[cfg(test)]
    pub(crate) fn routed(router: Router) -> Self {
        Self {
            router,
            direct: None,
        }
    }

    /// The response to `request`.
    pub async fn serve(&self, request: Request) -> Response {
        if let Some((edge, state)) = &self.direct
            && request.method() == Method::POST
            && let Some(api) = Api::at_client_path(request.uri().path())
        {
            let state = Arc::clone(state);
            let route = Some(Route::Direct(api.client_path()));
            let handler = move |request| endpoints::chat::serve(api, state, request);
            return edge.serve(request, route, handler).await;
        }
        // Boxed: inline, the router's future would make every request's
        // future (the chat path's too) as large as both, and that is
        // copied whole when a connection boxes it.
        match Box::pin(self.router.clone().oneshot(request)).await {
            Ok(response) => response,
            Err(never) => match never {},
        }
    }
}

/// The application: every route and layer, and the API routes' direct way.
pub fn app(state: SharedState) -> App {
    let edge = edge_of(&state);
    App {
        router: router_with(Arc::clone(&state), edge.clone()),
        direct: Some((Arc::new(edge), state)),
    }
}

/// The router with every route and layer.
pub fn router(state: SharedState) -> Router {
    let edge = edge_of(&state);
    router_with(state, edge)
}

fn edge_of(state: &SharedState) -> Edge {
    let config = state.config();
    Edge {
        max_body_bytes: config.server.max_body_bytes,
        body_read_timeout: config.server.body_read_timeout,
        trusted_proxies: config.server.trusted_proxies.clone().into(),
    }
}

fn router_with(state: SharedState, edge: Edge) -> Router {
    with_edge_layers(routes(), edge).with_state(state)
}

fn routes() -> Router<SharedState> {
    Router::new()
        .route(Api::Chat.client_path(), post(endpoints::chat::completions))
        .route(
            Api::Embeddings.client_path(),
            post(endpoints::chat::embeddings),
        )
        .route("/v1/models", get(endpoints::models::list))
        .route("/v1/models/{*id}", get(endpoints::models::retrieve))
        .route("/v1/usage", get(endpoints::usage::usage))
        // A catch-all needs a segment: `/v1/responses/` is routed alone.
        .route("/v1/responses", any(endpoints::responses::reject))
        .route("/v1/responses/", any(endpoints::responses::reject))
        .route("/v1/responses/{*rest}", any(endpoints::responses::reject))
        .route(
            "/admin/clients",
            get(endpoints::admin::list_clients).post(endpoints::admin::create_client),
        )
        .route(
            "/admin/clients/{name}",
            axum::routing::patch(endpoints::admin::change_client)
                .delete(endpoints::admin::delete_client),
        )
        .route(
            "/admin/clients/{name}/rotate",
            post(endpoints::admin::rotate_client),
        )
        .route(
            "/admin/teams",
            get(endpoints::admin::list_teams).post(endpoints::admin::create_team),
        )
        .route(
            "/admin/teams/{name}",
            axum::routing::patch(endpoints::admin::change_team)
                .delete(endpoints::admin::delete_team),
        )
        .route("/admin/reload", post(endpoints::admin::reload))
        .route("/admin/upstreams", get(endpoints::admin::upstreams))
        .route("/admin/usage", get(endpoints::admin::usage))
        .route("/admin/ui", get(endpoints::console::page))
        .route("/admin/ui/app.js", get(endpoints::console::script))
        .route("/admin/ui/style.css", get(endpoints::console::style))
        .route("/admin/ui/icon.svg", get(endpoints::console::icon))
        .route("/admin", any(endpoints::admin::not_found))
        .route("/admin/{*rest}", any(endpoints::admin::not_found))
        .route("/healthz", get(endpoints::probes::healthz))
        .route("/readyz", get(endpoints::probes::readyz))
        .route("/metrics", get(endpoints::probes::metrics))
        .fallback(endpoints::not_found)
        .method_not_allowed_fallback(endpoints::method_not_allowed)
}

/// Puts `router` behind the [`EdgeLayer`] every request meets (apart from
/// the routes, so tests can put a route of their own behind it).
fn with_edge_layers<S>(router: Router<S>, edge: Edge) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    router.layer(EdgeLayer::new(edge))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::body::Body;
    use axum::http::Request;
    use axum::http::StatusCode;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tower::ServiceExt;

    use super::*;
    use crate::access_log;

    /// A route that panics, and one that answers, behind Iris's layers.
    fn panicking() -> Router {
        let routes = Router::new()
            .route(
                "/panic",
                get(|| async {
                    if true {
                        panic!("a handler's bug");
                    }
                    "unreachable"
                }),
            )
            .route("/ok", get(|| async { "ok" }));
        let edge = Edge {
            max_body_bytes: 1024,
            body_read_timeout: std::time::Duration::from_secs(5),
            trusted_proxies: Vec::new().into(),
        };
        with_edge_layers(routes, edge)
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_500_in_openai_shape() {
        let response = panicking()
            .oneshot(Request::get("/panic").body(Body::empty()).expect("request"))
            .await
            .expect("a response, not an error");
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(response.headers()["content-type"], "application/json");
        assert!(
            response.headers().contains_key(access_log::REQUEST_ID),
            "the request id is stamped on it too"
        );
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        let error = &json["error"];
        assert_eq!(error["code"], "internal_error", "{json}");
        assert!(
            error["message"].is_string() && error["type"].is_string(),
            "{json}"
        );
        assert!(error.get("param").is_some(), "{json}");
    }

    /// Over a real connection: the client gets the 500, and the same
    /// keep-alive connection then serves its next request.
    #[tokio::test]
    async fn a_panic_keeps_the_connection_and_the_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move { axum::serve(listener, panicking()).await });
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        for (path, status, body) in [
            ("/panic", "500", "internal_error"),
            ("/ok", "200", "ok"),
            ("/panic", "500", "internal_error"),
        ] {
            let request = format!("GET {path} HTTP/1.1\r\nHost: iris\r\n\r\n");
            stream.write_all(request.as_bytes()).await.expect("write");
            let response = tokio::time::timeout(Duration::from_secs(5), read_response(&mut stream))
                .await
                .expect("answered in time");
            assert!(
                response.starts_with(&format!("HTTP/1.1 {status} ")),
                "{path}: {response}"
            );
            assert!(response.contains(body), "{path}: {response}");
        }
        server.abort();
    }

    /// One HTTP/1.1 response with a Content-Length body.
    async fn read_response(stream: &mut tokio::net::TcpStream) -> String {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            let n = stream.read(&mut chunk).await.expect("read");
            assert!(
                n > 0,
                "connection closed: {}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).into_owned();
            let Some(head_end) = text.find("\r\n\r\n") else {
                continue;
            };
            let length = text[..head_end]
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .expect("content-length");
            if buf.len() >= head_end + 4 + length {
                return text;
            }
        }
    }
}
