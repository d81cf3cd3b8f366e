//! Test support: the real Iris server on port 0 (or its router in-process)
//! against mock upstreams on port 0, and what the topics share to drive it.

#![allow(dead_code)]

pub mod app;
pub mod binary;
pub mod image_server;
pub mod mock_upstream;
pub mod ports;
pub mod postgres;
pub mod private_postgres;
pub mod redis;
pub mod redis_cluster;
mod skip;
pub mod tls;

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

/// The operator's key of [`admin_toml`].
pub const ADMIN_KEY: &str = "test-admin-key";

/// An `[admin]` table with [`ADMIN_KEY`]'s hash, for `base_config`'s `extra`.
pub fn admin_toml() -> String {
    format!("\n[admin]\nkey = \"{}\"\n", KeyHash::of(ADMIN_KEY))
}

/// Polls `check` every 20 ms until it holds, failing the test if it still
/// does not after `within`; returns how long it took.
pub async fn eventually(
    within: Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "{what}: not so after {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The loopback address [`Iris::key_works`] polls from.
pub const POLL_ADDRESS: [u8; 4] = [127, 0, 0, 77];

/// A running Iris.
pub struct Iris {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Iris {
    /// Starts Iris with a config given as TOML text.
    pub async fn start(config: &str) -> Self {
        Self::serve(state(config).await).await
    }

    /// Starts Iris from a config file, remembering its path as `iris serve`
    /// does, so `POST /admin/reload` (and `SIGHUP`) re-read it.
    pub async fn start_from_file(path: &std::path::Path) -> Self {
        iris::init_tls();
        let config = iris::config::load(path)
            .unwrap_or_else(|problems| panic!("test config is invalid:\n{problems}"));
        let state = AppState::new(config)
            .await
            .unwrap_or_else(|e| panic!("state: {e}"))
            .with_config_path(path.to_path_buf());
        Self::serve(state).await
    }

    /// Serves a state the test built itself.
    pub async fn serve(state: AppState) -> Self {
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

/// `spool_path = "…"` in a fresh directory of its own, for a test's
/// PostgreSQL spend log: without it the spool is `iris-spool.db` in the
/// working directory, which tests running at once in one process would
/// share. The directory is left for the OS to clean (it is under the
/// system's temporary directory).
pub fn own_spool() -> String {
    let dir = tempfile::Builder::new()
        .prefix("iris-test-spool-")
        .tempdir()
        .unwrap_or_else(|e| panic!("spool dir: {e}"))
        .keep();
    format!(
        "spool_path = {:?}\n",
        dir.join("spool.db").display().to_string()
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
        self.post("/v1/chat/completions", key, body, headers).await
    }

    /// `POST /v1/embeddings` as the client with `key`, with extra `headers`.
    pub async fn embed(
        &self,
        key: &str,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        self.post("/v1/embeddings", key, body, headers).await
    }

    /// `POST path` with `body` as JSON, as the client with `key`, with
    /// extra `headers`.
    pub async fn post(
        &self,
        path: &str,
        key: &str,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut request = http().post(self.url(path)).bearer_auth(key).json(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    /// The status of a plain chat completion for `model` as the client with `key`.
    pub async fn chat_status(&self, key: &str, model: &str) -> u16 {
        self.chat(key, &chat_body(model), &[])
            .await
            .status()
            .as_u16()
    }

    /// `method path` on the admin API with `key` (the admin key, or not),
    /// and `body` as JSON text when given: the status and the JSON answer.
    pub async fn admin_as(
        &self,
        key: Option<&str>,
        method: reqwest::Method,
        path: &str,
        body: Option<&str>,
    ) -> (u16, Value) {
        let mut request = http().request(method.clone(), self.url(path));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_owned());
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        status_and_json(response).await
    }

    /// [`Self::admin_as`] with [`ADMIN_KEY`].
    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&str>,
    ) -> (u16, Value) {
        self.admin_as(Some(ADMIN_KEY), method, path, body).await
    }

    /// Creates a managed client from `body` (JSON text) over the admin API;
    /// returns its key.
    pub async fn create_client(&self, body: &str) -> String {
        let (status, answer) = self
            .admin(reqwest::Method::POST, "/admin/clients", Some(body))
            .await;
        assert_eq!(status, 201, "{answer}");
        answer["key"]
            .as_str()
            .unwrap_or_else(|| panic!("no key in {answer}"))
            .to_owned()
    }

    /// `GET /admin/clients`'s entry for `name`, if listed.
    pub async fn listed(&self, name: &str) -> Option<Value> {
        let (status, list) = self
            .admin(reqwest::Method::GET, "/admin/clients", None)
            .await;
        assert_eq!(status, 200, "{list}");
        list["data"]
            .as_array()
            .unwrap_or_else(|| panic!("no data in {list}"))
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
    }

    /// The status of `GET /v1/models` with `key`, sent from `source` (a
    /// loopback address: failed authentication is counted per address).
    pub async fn models_status_from(&self, key: &str, source: std::net::IpAddr) -> u16 {
        reqwest::Client::builder()
            .no_proxy()
            .local_address(source)
            .build()
            .unwrap_or_else(|e| panic!("http client: {e}"))
            .get(self.url("/v1/models"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET /v1/models from {source}: {e}"))
            .status()
            .as_u16()
    }

    /// Whether `key` authenticates now. Asked from [`POLL_ADDRESS`], so that
    /// polling for a key to start working spends that address's allowance
    /// of failures, not the test's own.
    pub async fn key_works(&self, key: &str) -> bool {
        self.models_status_from(key, POLL_ADDRESS.into()).await == 200
    }

    /// Whether `key` is refused now (401; anything else but 200 fails the test).
    pub async fn key_refused(&self, key: &str) -> bool {
        match self.models_status_from(key, [127, 0, 0, 1].into()).await {
            200 => false,
            401 => true,
            other => panic!("GET /v1/models answered {other}"),
        }
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
        // Generous for a loaded machine: the wait ends once they are.
        let deadline = Instant::now() + Duration::from_secs(60);
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

/// Token counts from OpenAI's own tokenizer, not from Iris: a test that
/// expects a charge built from Iris's estimate (a prompt counted, generated
/// text counted when no usage came) compares it with these, never with the
/// estimate function itself. Printed by `o200k_reference.py` beside this
/// file: Python `tiktoken` 0.14.0 on o200k_base (its vocabulary checked
/// against the sha256 tiktoken pins), a prompt counted as OpenAI's cookbook
/// counts chat messages for gpt-4o (3 tokens per message, its values'
/// tokens, 3 priming the reply).
pub mod o200k {
    /// The prompt of [`super::chat_body`] and [`super::stream_body`]: one
    /// user message, "Say hello" (`max_tokens`, `stream` and the model are
    /// not part of it).
    pub const SAY_HELLO: u64 = 9;
    /// The prompt of one user message, "Tell me, in as many words as you
    /// like, about tokenizers.".
    pub const TELL_ME: u64 = 22;
    /// `WORDS[n]`: the text of the mock upstream's first `n` content chunks,
    /// `word0 word1 … word{n-1} `.
    pub const WORDS: [u64; 51] = [
        0, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31, 33, 35, 37, 39, 41, 43, 45, 47,
        49, 51, 53, 55, 57, 59, 61, 63, 65, 67, 69, 71, 73, 75, 77, 79, 81, 83, 85, 87, 89, 91, 93,
        95, 97, 99, 101,
    ];
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

/// `iris ARGS --config CONFIG`, run off the async threads.
pub async fn iris_cli(config: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut command = iris_command();
    command.args(args).arg("--config").arg(config);
    tokio::task::spawn_blocking(move || command.output().expect("run iris"))
        .await
        .unwrap()
}

pub fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The command's stdout, after asserting it succeeded (else its output).
pub fn ok(output: &std::process::Output) -> String {
    assert!(
        output.status.success(),
        "{}{}",
        stdout(output),
        stderr(output)
    );
    stdout(output)
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
