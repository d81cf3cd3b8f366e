//! Test support: the real Iris server on port 0 (or its router in-process)
//! against mock upstreams on port 0, and what the topics share to drive it.

#![allow(dead_code)]

pub mod app;
pub mod image_server;
pub mod mock_upstream;
pub mod postgres;
pub mod redis;
mod skip;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use iris::app::AppState;
use iris::keys::KeyHash;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use app::App;
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
        let state = state(config).await;
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

/// The state `iris serve` builds from a config given as TOML text.
pub async fn state(config: &str) -> AppState {
    iris::init_tls();
    let config = iris::config::parse(config, &|name| std::env::var(name).ok())
        .unwrap_or_else(|problems| panic!("test config is invalid:\n{problems}"));
    AppState::new(config)
        .await
        .unwrap_or_else(|e| panic!("state: {e}"))
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

/// [`chat_body`], asking for a streamed answer.
pub fn stream_body(model: &str) -> serde_json::Value {
    let mut body = chat_body(model);
    body["stream"] = serde_json::json!(true);
    body
}

impl Iris {
    /// `POST /v1/chat/completions` as the client with `key`, with extra
    /// `headers` (the mock upstream's `x-mock-*`, which Iris forwards).
    pub async fn chat(
        &self,
        key: &str,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut request = http()
            .post(self.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST /v1/chat/completions: {e}"))
    }

    /// The status of `GET path`.
    pub async fn status(&self, path: &str) -> u16 {
        http()
            .get(self.url(path))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
            .status()
            .as_u16()
    }

    /// `GET /metrics`.
    pub async fn metrics(&self) -> String {
        http()
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET /metrics: {e}"))
            .text()
            .await
            .unwrap_or_else(|e| panic!("metrics text: {e}"))
    }

    /// `GET /v1/usage` as the client with `key`.
    pub async fn usage(&self, key: &str) -> Value {
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

    /// What the client with `key` has used of `window`, as `/v1/usage` says.
    pub async fn used(&self, key: &str, window: &str) -> u64 {
        self.usage(key).await["windows"][window]["used"]
            .as_u64()
            .unwrap_or_else(|| panic!("no {window} in usage"))
    }

    /// Waits until no request of the client with `key` is in flight (every
    /// settlement done).
    pub async fn settled(&self, key: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.used(key, "max_concurrent").await > 0 {
            assert!(Instant::now() < deadline, "requests still in flight");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A response's status and its body as JSON (`null` when it is not JSON).
pub async fn status_and_json(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// What Iris estimates for a chat body's prompt.
pub fn prompt_estimate(body: &Value) -> u64 {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let request = iris::openai::chat::ChatRequest::parse(&bytes)
        .unwrap_or_else(|e| panic!("not a chat request: {e:?}"));
    iris::budget::estimate::prompt_tokens(&request)
}

/// The sum of the samples of metric `name` whose line contains every one of
/// `labels` (such as `client="b"`), in Prometheus text.
pub fn metric_sum(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|line| line.starts_with(name) && labels.iter().all(|l| line.contains(l)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The `iris` binary, with no config path or log format from this
/// environment.
pub fn iris_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_iris"));
    command
        .env_remove("IRIS_CONFIG")
        .env_remove("IRIS_LOG_FORMAT");
    command
}

/// `text` in a temporary `.toml` file, deleted on drop.
pub fn write_config(text: &str) -> tempfile::NamedTempFile {
    let file = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .unwrap_or_else(|e| panic!("temp file: {e}"));
    std::fs::write(file.path(), text).unwrap_or_else(|e| panic!("write config: {e}"));
    file
}

/// The cells of `window`'s row of `iris usage --client <client>` run on
/// `config`: client, window, limit, used, remaining, reset.
pub fn usage_row(config: &str, client: &str, window: &str) -> Vec<String> {
    let file = write_config(config);
    let output = iris_command()
        .args(["usage", "--client", client, "--config"])
        .arg(file.path())
        .output()
        .unwrap_or_else(|e| panic!("iris usage: {e}"));
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    report
        .lines()
        .find(|line| line.contains(window))
        .unwrap_or_else(|| panic!("no {window} in {report}"))
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}
