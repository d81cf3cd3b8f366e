//! Routing between a model's deployments, through the real server against a
//! farm of mock upstreams on port 0 that fail on cue (`support::mock_upstream`):
//! failover and retries, weights and priority tiers, cooldowns, upstream
//! pacing and its fair queue, mid-stream failures, one charge and one image
//! fetch per request, the `x-iris-*` headers, metrics and logs, `iris check`,
//! and two instances sharing cooldowns and pacing through Redis.
//!
//! Metrics are process-wide in this binary, so every test names its
//! upstreams and models after itself.
//!
//! This module holds what the topics share: the config builder and the
//! reader of answers.

mod accounting;
mod check;
mod failover;
mod farm;
mod pacing;
mod selection;
mod shared;
mod streams;

use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use futures_util::StreamExt as _;
use iris::keys::KeyHash;
use serde_json::{Value, json};

use crate::support::{Iris, KEY_A, KEY_B, MockUpstream, chat_body, http, metric_sum};

/// A config for a farm: `[[upstreams]]` tables, `[[models]]`, `[routing]`,
/// a store, and clients `a` and `b` (keys [`KEY_A`], [`KEY_B`]), both
/// allowed every model, with a large daily budget and `max_concurrent` (so
/// `/v1/usage` reports what they were charged and when they are settled).
pub struct Config {
    upstreams: String,
    models: String,
    routing: String,
    store: String,
    extra: String,
}

impl Config {
    pub fn new() -> Self {
        Self {
            upstreams: String::new(),
            models: String::new(),
            routing: String::new(),
            store: "[store]\nkind = \"memory\"\n".into(),
            extra: String::new(),
        }
    }

    /// An `[[upstreams]]` table named `name` at `base_url`, with the API
    /// key `secret-<name>` and `keys` (TOML lines); `timeout_ms = 2000`
    /// unless `keys` sets it.
    pub fn upstream(mut self, name: &str, base_url: &str, keys: &str) -> Self {
        let timeout = if keys.contains("timeout_ms") {
            ""
        } else {
            "timeout_ms = 2000\n"
        };
        self.upstreams.push_str(&format!(
            "\n[[upstreams]]\nname = \"{name}\"\nbase_url = \"{base_url}\"\napi_key = \"secret-{name}\"\n{timeout}{keys}\n"
        ));
        self
    }

    /// A `[[models]]` table named `name` with one deployment per
    /// `(upstream, fields)`, `fields` being extra inline-table fields such
    /// as `weight = 2, priority = 1`.
    pub fn model(mut self, name: &str, deployments: &[(&str, &str)]) -> Self {
        let deployments: Vec<String> = deployments
            .iter()
            .map(|(upstream, fields)| {
                let fields = if fields.is_empty() {
                    String::new()
                } else {
                    format!(", {fields}")
                };
                format!("  {{ upstream = \"{upstream}\"{fields} }},\n")
            })
            .collect();
        self.models.push_str(&format!(
            "\n[[models]]\nname = \"{name}\"\ndeployments = [\n{}]\n",
            deployments.concat()
        ));
        self
    }

    /// A `[[models]]` table in the one-deployment shorthand.
    pub fn single(mut self, name: &str, upstream: &str) -> Self {
        self.models.push_str(&format!(
            "\n[[models]]\nname = \"{name}\"\nupstream = \"{upstream}\"\n"
        ));
        self
    }

    /// The `[routing]` table's lines.
    pub fn routing(mut self, lines: &str) -> Self {
        self.routing.push_str(lines);
        self.routing.push('\n');
        self
    }

    /// The whole `[store]` table.
    pub fn store(mut self, table: &str) -> Self {
        self.store = table.to_owned();
        self
    }

    /// Tables appended as they are (`[images]`).
    pub fn extra(mut self, tables: &str) -> Self {
        self.extra.push_str(tables);
        self.extra.push('\n');
        self
    }

    pub fn text(&self) -> String {
        let routing = if self.routing.is_empty() {
            String::new()
        } else {
            format!("\n[routing]\n{}", self.routing)
        };
        format!(
            r#"
[server]
listen = "127.0.0.1:0"
shutdown_grace_ms = 2000

{store}
{upstreams}
{models}
{routing}

[[clients]]
name = "a"
key = "{a}"
models = ["*"]
[clients.budget]
tokens_per_day = 100000000
max_concurrent = 1000

[[clients]]
name = "b"
key = "{b}"
models = ["*"]
[clients.budget]
tokens_per_day = 100000000
max_concurrent = 1000

{extra}
"#,
            store = self.store,
            upstreams = self.upstreams,
            models = self.models,
            extra = self.extra,
            a = KeyHash::of(KEY_A),
            b = KeyHash::of(KEY_B),
        )
    }

    pub async fn start(&self) -> Iris {
        Iris::start(&self.text()).await
    }
}

/// `N` mock upstreams, each on its own port.
pub async fn farm<const N: usize>() -> [MockUpstream; N] {
    let mut mocks = Vec::with_capacity(N);
    for _ in 0..N {
        mocks.push(MockUpstream::start().await);
    }
    mocks
        .try_into()
        .unwrap_or_else(|_| unreachable!("N mocks were started"))
}

/// An answer, read whole (or as far as it came).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub text: String,
    /// The body ended with an error (the connection died) instead of its end.
    pub broken: bool,
    /// From sending the request to the end of the body.
    pub elapsed: Duration,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// `x-iris-upstream`: the upstream that answered, or was tried last.
    pub fn upstream(&self) -> &str {
        self.header("x-iris-upstream")
            .unwrap_or_else(|| panic!("no x-iris-upstream on a {}: {}", self.status, self.text))
    }

    /// `x-iris-attempts`.
    pub fn attempts(&self) -> u32 {
        self.header("x-iris-attempts")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no x-iris-attempts on a {}: {}", self.status, self.text))
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("{} answered no JSON ({e}): {}", self.status, self.text))
    }

    /// The `error` object of an error Iris produced itself (JSON, OpenAI's shape).
    pub fn error(&self) -> Value {
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "errors are JSON: {}",
            self.text
        );
        self.json()["error"].clone()
    }

    /// The data of each server-sent event, in order.
    pub fn events(&self) -> Vec<&str> {
        self.text
            .split("\n\n")
            .filter_map(|event| event.trim().strip_prefix("data:"))
            .map(str::trim)
            .collect()
    }

    /// The concatenated `delta.content` of the streamed chunks.
    pub fn streamed_content(&self) -> String {
        self.events()
            .iter()
            .filter_map(|data| serde_json::from_str::<Value>(data).ok())
            .filter_map(|chunk| {
                chunk["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(String::from)
            })
            .collect()
    }

    /// Asserts a 200 event stream that relayed the role chunk and `words`
    /// content chunks, then ended with exactly one `upstream_stream_interrupted`
    /// error event, no `[DONE]`, and a clean end of the body.
    pub fn assert_interrupted(&self, words: usize) {
        assert_eq!(self.status, 200, "{}", self.text);
        assert_eq!(self.header("content-type"), Some("text/event-stream"));
        let expected: String = (0..words).map(|i| format!("word{i} ")).collect();
        assert_eq!(self.streamed_content(), expected, "{}", self.text);
        let events = self.events();
        assert!(
            !events.contains(&"[DONE]"),
            "no [DONE] after a failure: {}",
            self.text
        );
        let errors: Vec<&&str> = events.iter().filter(|e| e.contains("\"error\"")).collect();
        assert_eq!(errors.len(), 1, "one error event: {}", self.text);
        let last: Value = serde_json::from_str(events.last().copied().unwrap_or(""))
            .unwrap_or_else(|e| panic!("the last event is JSON ({e}): {}", self.text));
        let error = &last["error"];
        assert_eq!(error["code"], "upstream_stream_interrupted", "{last}");
        assert_eq!(error["type"], "server_error", "{last}");
        assert!(error["param"].is_null(), "{last}");
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{last}"
        );
        assert!(
            !self.broken,
            "the stream ends cleanly after the error event, so clients read it"
        );
    }
}

/// `POST /v1/chat/completions` at `base` (`http://host:port`) as the
/// client with `key`, with extra `headers`; the answer read whole.
pub async fn ask_at(base: &str, key: &str, body: &Value, headers: &[(&str, &str)]) -> Reply {
    let started = Instant::now();
    let mut request = http()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .timeout(Duration::from_secs(60))
        .json(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST /v1/chat/completions: {e}"));
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let mut bytes = Vec::new();
    let mut broken = false;
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(chunk) => bytes.extend_from_slice(&chunk),
            Err(_) => {
                broken = true;
                break;
            }
        }
    }
    Reply {
        status,
        headers,
        text: String::from_utf8_lossy(&bytes).into_owned(),
        broken,
        elapsed: started.elapsed(),
    }
}

/// [`ask_at`] on `iris`.
pub async fn ask(iris: &Iris, key: &str, body: &Value, headers: &[(&str, &str)]) -> Reply {
    ask_at(&iris.url(""), key, body, headers).await
}

/// A plain chat request for `model` as client `a`.
pub async fn chat(iris: &Iris, model: &str) -> Reply {
    ask(iris, KEY_A, &chat_body(model), &[]).await
}

/// A streamed chat request for `model` as client `a`.
pub async fn stream(iris: &Iris, model: &str) -> Reply {
    ask(iris, KEY_A, &crate::support::stream_body(model), &[]).await
}

/// Asserts a 200 chat completion answered by `upstream` in `attempts`.
#[track_caller]
pub fn assert_answered(reply: &Reply, upstream: &str, attempts: u32) {
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(
        (reply.upstream(), reply.attempts()),
        (upstream, attempts),
        "{}",
        reply.text
    );
}

/// The sum of `name`'s samples with every one of `labels` on `iris`.
pub async fn metric(iris: &Iris, name: &str, labels: &[&str]) -> f64 {
    metric_sum(&iris.metrics().await, name, labels)
}

/// `iris_upstream_attempts_total{upstream, outcome}`.
pub async fn attempts_metric(iris: &Iris, upstream: &str, outcome: &str) -> f64 {
    let upstream = format!("upstream=\"{upstream}\"");
    let outcome = format!("outcome=\"{outcome}\"");
    metric(iris, "iris_upstream_attempts_total", &[&upstream, &outcome]).await
}

/// A chat body asking for `max_tokens`.
pub fn capped_body(model: &str, max_tokens: u64) -> Value {
    let mut body = chat_body(model);
    body["max_tokens"] = json!(max_tokens);
    body
}

/// Waits (up to 10 s) until `check` holds, asking again every 50 ms.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
