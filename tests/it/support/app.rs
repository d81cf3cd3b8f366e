//! Iris in-process: a request goes through `iris::app::app` (every route
//! and every layer, request ids and access log included) as the server's
//! connections hand it over, with no socket and no server task. For tests
//! of what one request gets back; streaming, hang-ups, shutdown and the
//! binary stay on a real socket ([`super::Iris`]).

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, Request, header, request};
use iris::app::AppState;
use serde_json::Value;

/// One Iris's application, built once.
pub struct App {
    app: iris::app::App,
}

impl App {
    /// Iris with a config given as TOML text, as `iris serve` would build it.
    pub async fn start(config: &str) -> Self {
        Self::with_state(super::state(config).await)
    }

    /// Iris on a state the test built (or changed) itself.
    pub fn with_state(state: AppState) -> Self {
        Self {
            app: iris::app::app(Arc::new(state)),
        }
    }

    pub async fn send(&self, request: Request<Body>) -> Answer {
        let response = self.app.serve(request).await;
        let (parts, body) = response.into_parts();
        let body = axum::body::to_bytes(body, usize::MAX)
            .await
            .unwrap_or_else(|e| panic!("response body: {e}"));
        Answer {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        }
    }

    /// `GET path`, with `key` as the bearer token when given.
    pub async fn get(&self, path: &str, key: Option<&str>) -> Answer {
        self.send(to(Method::GET, path, key).body(Body::empty()).unwrap())
            .await
    }

    /// `POST path` with `body` as JSON.
    pub async fn post_json(&self, path: &str, key: Option<&str>, body: &Value) -> Answer {
        self.post(path, key, body.to_string()).await
    }

    /// `POST path` with `body` as it is, labelled JSON.
    pub async fn post(&self, path: &str, key: Option<&str>, body: impl Into<Body>) -> Answer {
        let request = to(Method::POST, path, key)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body.into())
            .unwrap();
        self.send(request).await
    }
}

/// A request to `path`, with `key` as the bearer token when given.
pub fn to(method: Method, path: &str, key: Option<&str>) -> request::Builder {
    let request = Request::builder().method(method).uri(path);
    match key {
        Some(key) => request.header(header::AUTHORIZATION, format!("Bearer {key}")),
        None => request,
    }
}

/// A response, read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} answered no JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    /// The `error` object of an OpenAI-shaped error, which is always JSON.
    pub fn error(&self) -> Value {
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "errors are JSON"
        );
        self.json()["error"].clone()
    }
}
