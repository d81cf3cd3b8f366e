//! Reloading the config without a restart (issue 12, item 1): `POST
//! /admin/reload` on a server started from a file, and `SIGHUP` to the
//! binary. A good reload takes effect at once for new requests while one in
//! flight finishes on its snapshot; a bad one (invalid, or changing what
//! needs a restart) changes nothing and says why, with key paths; outcomes
//! are counted in `iris_config_reloads_total`.

use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use iris::keys::KeyHash;
use serde_json::Value;

use crate::support::{
    ADMIN_KEY, Iris, KEY_A, KEY_B, MockUpstream, POLL_ADDRESS, admin_toml, base_config, chat_body,
    eventually, http, iris_command, metric_sum, stream_body,
};

const KEY_C: &str = "test-key-c";

/// The config a server starts with: `base_config` (clients `a` and `b`,
/// models `test-model` and `other-model`) with `[admin]`.
fn before(upstream: &str) -> String {
    base_config(upstream, &admin_toml())
}

/// [`before`] without client `b`, with a new client `c` and a new model
/// `new-model` (upstream name `upstream-new`).
fn after(upstream: &str) -> String {
    let b = format!(
        "[[clients]]\nname = \"b\"\nkey = \"{}\"\nmodels = [\"other-model\"]\n",
        KeyHash::of(KEY_B)
    );
    let config = before(upstream);
    assert!(config.contains(&b), "base_config changed its client b");
    config.replacen(&b, "", 1)
        + &format!(
            "\n[[models]]\nname = \"new-model\"\nupstream = \"mock\"\nupstream_model = \"upstream-new\"\n\n[[clients]]\nname = \"c\"\nkey = \"{}\"\n",
            KeyHash::of(KEY_C)
        )
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write the config");
}

async fn reload(iris: &Iris) -> (u16, Value) {
    iris.admin(reqwest::Method::POST, "/admin/reload", None)
        .await
}

/// Each budget window's limit and use (not its reset countdown, which moves).
fn windows(usage: &Value) -> Vec<(String, Value, Value)> {
    usage["windows"]
        .as_object()
        .expect("windows")
        .iter()
        .map(|(name, w)| (name.clone(), w["limit"].clone(), w["used"].clone()))
        .collect()
}

/// Asserts the server runs [`before`]: `b` in, `c` out, no `new-model`.
async fn runs_before(iris: &Iris) {
    assert_eq!(iris.chat_status(KEY_B, "other-model").await, 200, "b works");
    assert_eq!(
        iris.chat_status(KEY_C, "test-model").await,
        401,
        "c is unknown"
    );
    assert_eq!(
        iris.chat_status(KEY_A, "new-model").await,
        404,
        "new-model is unknown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_a_model_and_a_client_and_removes_one_while_a_stream_finishes() {
    let upstream = MockUpstream::start().await;
    let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    write(file.path(), &before(&upstream.base_url()));
    let iris = Iris::start_from_file(file.path()).await;
    runs_before(&iris).await;
    assert_eq!(iris.chat_status(KEY_A, "test-model").await, 200);
    iris.settled(KEY_A).await;
    let usage_before = windows(&iris.usage(KEY_A).await);
    assert!(
        usage_before
            .iter()
            .any(|(_, _, used)| used.as_u64() > Some(0)),
        "a has used something: {usage_before:?}"
    );

    // A stream of b's, started before the reload that removes b.
    let mut stream = iris
        .chat(
            KEY_B,
            &stream_body("other-model"),
            &[("x-mock-chunks", "8"), ("x-mock-chunk-delay-ms", "150")],
        )
        .await;
    assert_eq!(stream.status(), 200);
    let mut text = String::new();
    let first = stream.chunk().await.unwrap().expect("a first chunk");
    text.push_str(&String::from_utf8_lossy(&first));

    write(file.path(), &after(&upstream.base_url()));
    let reloaded_at = Instant::now();
    let (status, answer) = reload(&iris).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "reloaded");

    // New requests see the new config at once.
    assert_eq!(
        iris.chat_status(KEY_B, "other-model").await,
        401,
        "b is gone"
    );
    assert_eq!(iris.chat_status(KEY_C, "test-model").await, 200, "c is in");
    assert_eq!(
        iris.chat_status(KEY_C, "new-model").await,
        200,
        "new-model answers"
    );
    let sent = upstream.received();
    let sent: Value = serde_json::from_slice(&sent.last().unwrap().body).unwrap();
    assert_eq!(sent["model"], "upstream-new");
    assert!(
        !text.contains("[DONE]"),
        "the stream ended before the reload: the test proves nothing"
    );

    // The stream started before goes on to its end, under the old config.
    let mut after_reload = 0;
    while let Some(chunk) = stream.chunk().await.unwrap() {
        after_reload += 1;
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(after_reload > 0, "nothing came after the reload");
    assert!(
        reloaded_at.elapsed() > Duration::from_millis(300),
        "the stream was not in flight across the reload"
    );
    for i in 0..8 {
        assert!(
            text.contains(&format!("word{i} ")),
            "word{i} missing: {text}"
        );
    }
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(!text.contains("\"error\""), "{text}");

    // The surviving client's budget use is untouched.
    assert_eq!(windows(&iris.usage(KEY_A).await), usage_before);
}

/// [`after`] with a typo'd key and a model on a missing upstream.
fn invalid(upstream: &str) -> String {
    after(upstream).replacen("timeout_ms = 2000", "timeot_ms = 2000", 1)
        + "\n[[models]]\nname = \"broken\"\nupstream = \"missing\"\n"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_reload_changes_nothing_and_names_each_problem_by_key_path() {
    let upstream = MockUpstream::start().await;
    let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    write(file.path(), &before(&upstream.base_url()));
    let iris = Iris::start_from_file(file.path()).await;

    write(file.path(), &invalid(&upstream.base_url()));
    let (status, answer) = reload(&iris).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["code"], "config_invalid");
    let message = answer["error"]["message"].as_str().unwrap();
    for problem in [
        "upstreams[0].timeot_ms: unknown key",
        "models[3].upstream: no upstream named \"missing\"",
    ] {
        assert!(message.contains(problem), "{problem:?} not in {message:?}");
    }
    runs_before(&iris).await;

    let base = before(&upstream.base_url());
    for text in [
        "[server\nlisten = ".to_owned(),
        base.clone() + "\n[images]\nmax_bytes = \"big\"\n",
        base.replacen(&KeyHash::of(KEY_A).to_string(), "not-a-hash", 1),
    ] {
        write(file.path(), &text);
        let (status, answer) = reload(&iris).await;
        assert_eq!(status, 400, "{text:?}: {answer}");
        assert_eq!(answer["error"]["code"], "config_invalid", "{text:?}");
        runs_before(&iris).await;
    }
    std::fs::remove_file(file.path()).unwrap();
    let (status, answer) = reload(&iris).await;
    assert_eq!(status, 400, "a missing file: {answer}");
    runs_before(&iris).await;

    // A good file after the bad ones is taken.
    write(file.path(), &after(&upstream.base_url()));
    let (status, answer) = reload(&iris).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(iris.chat_status(KEY_C, "test-model").await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_the_listen_address_the_store_or_the_spend_log_is_refused_and_changes_nothing()
 {
    let upstream = MockUpstream::start().await;
    let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    let dir = tempfile::tempdir().unwrap();
    write(file.path(), &before(&upstream.base_url()));
    let iris = Iris::start_from_file(file.path()).await;

    let moved = after(&upstream.base_url()).replacen(
        "listen = \"127.0.0.1:0\"",
        "listen = \"127.0.0.1:1\"",
        1,
    );
    let stored = after(&upstream.base_url()).replacen(
        "[store]\nkind = \"memory\"\n",
        &format!(
            "[store]\nkind = \"sqlite\"\npath = \"{}\"\n",
            dir.path().join("iris.db").display()
        ),
        1,
    );
    let logged = format!(
        "{}\n[spend_log]\nkind = \"off\"\n",
        after(&upstream.base_url())
    );
    for (text, section) in [
        (&moved, "[server]"),
        (&stored, "[store]"),
        (&logged, "[spend_log]"),
    ] {
        write(file.path(), text);
        let (status, answer) = reload(&iris).await;
        assert_eq!(status, 409, "{section}: {answer}");
        assert_eq!(answer["error"]["code"], "restart_required");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(section), "{message}");
        runs_before(&iris).await;
    }
    assert!(
        !dir.path().join("iris.db").exists(),
        "a refused reload opened the new store"
    );
}

#[tokio::test]
async fn a_server_started_without_a_file_says_there_is_nothing_to_reload() {
    let upstream = MockUpstream::start().await;
    let iris = Iris::start(&before(&upstream.base_url())).await;
    let (status, answer) = reload(&iris).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["code"], "config_invalid");
    assert_eq!(iris.chat_status(KEY_B, "other-model").await, 200);
}

// ----------------------------------------------------------- the binary

/// `iris serve` in a child process, killed if the test fails first; its
/// JSON log lines arrive on `logs`.
struct Served {
    child: Option<Child>,
    logs: Receiver<Value>,
    addr: String,
}

impl Served {
    fn start(config: &Path) -> Self {
        let mut child = iris_command()
            .args(["serve", "--config"])
            .arg(config)
            .env("IRIS_LOG", "info")
            .env("IRIS_LOG_FORMAT", "json")
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn iris serve");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, logs) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let json = serde_json::from_str(&line).unwrap_or(Value::String(line));
                if tx.send(json).is_err() {
                    return;
                }
            }
        });
        let mut served = Self {
            child: Some(child),
            logs,
            addr: String::new(),
        };
        let line = served.log_line(|l| l["message"] == "iris is serving");
        served.addr = line["listen"].as_str().expect("listen").to_owned();
        served
    }

    /// The next log line that `matches`, within 10 s.
    fn log_line(&self, matches: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .logs
                .recv_timeout(left)
                .expect("the expected log line within 10 s");
            if matches(&line) {
                return line;
            }
        }
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let status = Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    async fn status(&self, key: &str, model: &str, source: IpAddr) -> u16 {
        // A test run in a process of its own (nextest) builds no other
        // client first.
        iris::init_tls();
        reqwest::Client::builder()
            .no_proxy()
            .local_address(source)
            .build()
            .unwrap()
            .post(format!("http://{}/v1/chat/completions", self.addr))
            .bearer_auth(key)
            .json(&chat_body(model))
            .send()
            .await
            .expect("chat")
            .status()
            .as_u16()
    }

    async fn metric(&self, result: &str) -> f64 {
        let text = http()
            .get(format!("http://{}/metrics", self.addr))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        metric_sum(
            &text,
            "iris_config_reloads_total",
            &[&format!("result=\"{result}\"")],
        )
    }

    /// SIGTERM, and the exit code.
    async fn stop(mut self) -> Option<i32> {
        self.signal("-TERM");
        let mut child = self.child.take().expect("running");
        tokio::task::spawn_blocking(move || child.wait().expect("wait"))
            .await
            .unwrap()
            .code()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_binary_and_every_outcome_is_logged_and_counted() {
    let upstream = MockUpstream::start().await;
    let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    write(file.path(), &before(&upstream.base_url()));
    let served = Served::start(file.path());
    let here: IpAddr = [127, 0, 0, 1].into();
    assert_eq!(served.status(KEY_A, "test-model", here).await, 200);
    assert_eq!(served.status(KEY_C, "test-model", here).await, 401);
    for result in ["ok", "invalid", "restart_required"] {
        assert_eq!(served.metric(result).await, 0.0, "{result}");
    }

    write(file.path(), &after(&upstream.base_url()));
    served.signal("-HUP");
    served.log_line(|l| l["message"] == "config reloaded");
    eventually(Duration::from_secs(5), "c works after SIGHUP", async || {
        served
            .status(KEY_C, "test-model", POLL_ADDRESS.into())
            .await
            == 200
    })
    .await;
    assert_eq!(served.status(KEY_B, "other-model", here).await, 401);
    assert_eq!(served.status(KEY_A, "new-model", here).await, 200);
    assert_eq!(served.metric("ok").await, 1.0);

    // Invalid: each problem logged with its key path; nothing changes.
    write(file.path(), &invalid(&upstream.base_url()));
    served.signal("-HUP");
    for path in ["upstreams[0].timeot_ms", "models[3].upstream"] {
        let line = served.log_line(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("config not reloaded") && m.contains(path))
        });
        assert_eq!(line["level"], "ERROR", "{line}");
    }
    assert_eq!(served.metric("invalid").await, 1.0);
    assert_eq!(served.status(KEY_C, "test-model", here).await, 200);

    // A new listen address: refused, said, counted; the server stays.
    let moved = after(&upstream.base_url()).replacen(
        "listen = \"127.0.0.1:0\"",
        "listen = \"127.0.0.1:1\"",
        1,
    );
    write(file.path(), &moved);
    served.signal("-HUP");
    served.log_line(|l| {
        l["message"]
            .as_str()
            .is_some_and(|m| m.contains("needs a restart") && m.contains("[server]"))
    });
    assert_eq!(served.metric("restart_required").await, 1.0);
    assert_eq!(served.status(KEY_C, "test-model", here).await, 200);

    // The admin endpoint reloads the same way, counted alike.
    write(file.path(), &before(&upstream.base_url()));
    let (status, answer) = {
        let response = http()
            .post(format!("http://{}/admin/reload", served.addr))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await
            .unwrap();
        crate::support::status_and_json(response).await
    };
    assert_eq!(status, 200, "{answer}");
    assert_eq!(served.metric("ok").await, 2.0);
    assert_eq!(served.status(KEY_B, "other-model", here).await, 200);
    assert_eq!(served.stop().await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_names_a_config_client_like_a_managed_one_is_refused() {
    // Else both clients would be in, sharing one budget (kept by name), and
    // the managed one could no longer be disabled, rotated or deleted: the
    // admin API and the CLI refuse a name the config file has (409).
    let upstream = MockUpstream::start().await;
    let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    write(file.path(), &before(&upstream.base_url()));
    let iris = Iris::start_from_file(file.path()).await;
    let managed = iris.create_client(r#"{"name": "c"}"#).await;

    write(file.path(), &after(&upstream.base_url()));
    let (status, answer) = reload(&iris).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["code"], "config_invalid");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.contains("clients[1].name"), "{message}");
    runs_before(&iris).await;
    let (status, answer) = iris
        .admin(reqwest::Method::DELETE, "/admin/clients/c", None)
        .await;
    assert_eq!(status, 200, "the managed client is still managed: {answer}");
    assert!(iris.key_refused(&managed).await);

    // With the managed one gone, the name is free for the config.
    let (status, answer) = reload(&iris).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(iris.chat_status(KEY_C, "test-model").await, 200);
}
