//! Test support: the real Iris server on port 0 against mock upstreams on port 0.

#![allow(dead_code)]

pub mod image_server;
pub mod mock_upstream;
pub mod redis;
mod skip;

use std::net::SocketAddr;

use iris::app::AppState;
use iris::keys::KeyHash;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use mock_upstream::MockUpstream;
pub use skip::skip;

/// Keys of the clients in [`base_config`].
pub const KEY_A: &str = "test-key-a";
pub const KEY_B: &str = "test-key-b";

/// A running Iris.
pub struct Iris {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Iris {
    /// Starts Iris with a config given as TOML text.
    pub async fn start(config: &str) -> Self {
        iris::init_tls();
        let config = iris::config::parse(config, &|name| std::env::var(name).ok())
            .unwrap_or_else(|problems| panic!("test config is invalid:\n{problems}"));
        let state = AppState::new(config)
            .await
            .unwrap_or_else(|e| panic!("state: {e}"));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("addr: {e}"));
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(iris::server::run(listener, state, async move {
            let _ = rx.await;
        }));
        Self {
            addr,
            shutdown: Some(tx),
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Sends the shutdown signal and waits for the server to stop.
    pub async fn stop(mut self) -> std::io::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        (&mut self.task)
            .await
            .unwrap_or_else(|e| panic!("server task: {e}"))
    }

    /// Signals shutdown without waiting.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    pub async fn join(self) -> std::io::Result<()> {
        self.task
            .await
            .unwrap_or_else(|e| panic!("server task: {e}"))
    }
}

/// One upstream named `mock`, models `test-model` (renamed upstream to
/// `upstream-model`) and `other-model`, clients `a` (every model) and `b`
/// (only `other-model`), and an in-memory store. `extra` is appended.
pub fn base_config(upstream: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
shutdown_grace_ms = 2000

[store]
kind = "memory"

[[upstreams]]
name = "mock"
base_url = "{upstream}"
api_key = "upstream-secret-key"
timeout_ms = 2000

[[models]]
name = "test-model"
upstream = "mock"
upstream_model = "upstream-model"

[[models]]
name = "other-model"
upstream = "mock"

[[clients]]
name = "a"
key = "{a}"

[[clients]]
name = "b"
key = "{b}"
models = ["other-model"]
{extra}
"#,
        a = KeyHash::of(KEY_A),
        b = KeyHash::of(KEY_B),
    )
}

/// A client for tests: no proxies, no pooling surprises.
pub fn http() -> reqwest::Client {
    iris::init_tls();
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap_or_else(|e| panic!("http client: {e}"))
}

pub fn chat_body(model: &str) -> serde_json::Value {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": "Say hello"}]})
}

impl Iris {
    /// `GET /v1/usage` as the client with `key`.
    pub async fn usage(&self, key: &str) -> serde_json::Value {
        let response = http()
            .get(self.url("/v1/usage"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET /v1/usage: {e}"));
        assert_eq!(response.status(), 200);
        response
            .json()
            .await
            .unwrap_or_else(|e| panic!("usage JSON: {e}"))
    }
}
