//! Secrets are never printed: the real `iris` binary at `IRIS_LOG=trace`
//! (plain and JSON logs), driven through successes and failures, and every
//! byte it wrote (stdout, stderr), served (`/metrics`, every response's
//! head and body) or sent on shutdown is searched for each secret: the
//! client's key, a wrong key, the upstream's key, and the password in the
//! Redis URL (a Redis that cannot be reached: nothing leaves the machine).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

mod support;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::Duration;

use iris::keys::KeyHash;
use support::MockUpstream;

const CLIENT_KEY: &str = "iris-client-key-0f3c9a7e51";
const WRONG_KEY: &str = "iris-wrong-key-6d2b8c4a90";
const UPSTREAM_KEY: &str = "sk-upstream-key-4e7a1b9c22";
const REDIS_PASSWORD: &str = "redis-password-8b5d3f1a77";

fn config(upstream: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
shutdown_grace_ms = 2000

[store]
kind = "redis"
# Port 1 on loopback: refused at once, so the store is unavailable and
# requests are counted locally.
url = "redis://:{REDIS_PASSWORD}@127.0.0.1:1/13"
on_unavailable = "allow"
timeout_ms = 200

[[upstreams]]
name = "mock"
base_url = "{upstream}"
api_key = "{UPSTREAM_KEY}"
timeout_ms = 2000

[[upstreams]]
name = "gone"
base_url = "http://127.0.0.1:1/v1"
api_key = "{UPSTREAM_KEY}"
timeout_ms = 2000

[[models]]
name = "test-model"
upstream = "mock"

[[models]]
name = "gone-model"
upstream = "gone"

[[clients]]
name = "a"
key = "{key}"
"#,
        key = KeyHash::of(CLIENT_KEY)
    )
}

/// Runs `iris serve` with `format` logs at trace level, sends requests of
/// every kind through it, stops it with SIGTERM and returns everything it
/// printed and answered.
async fn everything_iris_said(format: &str) -> String {
    let upstream = MockUpstream::start().await;
    let file = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("temp file");
    std::fs::write(file.path(), config(&upstream.base_url())).expect("write config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_iris"))
        .args(["serve", "--config"])
        .arg(file.path())
        .env_remove("IRIS_CONFIG")
        .env("IRIS_LOG", "trace")
        .env("IRIS_LOG_FORMAT", format)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn iris");
    let mut stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    let stderr_reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line.clone());
            all.push(line);
        }
        all.join("\n")
    });
    let stdout_reader = std::thread::spawn(move || {
        let mut all = String::new();
        let _ = stdout.read_to_string(&mut all);
        all
    });
    let addr = loop {
        let line = lines_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("iris starts");
        if line.contains("iris is serving") {
            let at = line.find("127.0.0.1:").expect("the address");
            break line[at..]
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                .collect::<String>();
        }
    };

    let client = support::http();
    let url = |path: &str| format!("http://{addr}{path}");
    let mut answers = String::new();
    let chat = serde_json::json!({"model": "test-model", "messages": [{"role": "user", "content": "Hello"}]});
    let streamed = serde_json::json!({"model": "test-model", "stream": true, "messages": [{"role": "user", "content": "Hello"}]});
    let gone = serde_json::json!({"model": "gone-model", "messages": [{"role": "user", "content": "Hello"}]});
    let requests = [
        (
            client
                .post(url("/v1/chat/completions"))
                .bearer_auth(CLIENT_KEY)
                .json(&chat),
            200,
        ),
        (
            client
                .post(url("/v1/chat/completions"))
                .bearer_auth(CLIENT_KEY)
                .json(&streamed),
            200,
        ),
        (
            client
                .post(url("/v1/chat/completions"))
                .bearer_auth(WRONG_KEY)
                .json(&chat),
            401,
        ),
        (
            client
                .post(url("/v1/chat/completions"))
                .bearer_auth(CLIENT_KEY)
                .json(&gone),
            502,
        ),
        (
            client
                .post(url("/v1/chat/completions"))
                .bearer_auth(CLIENT_KEY)
                .body("{not json"),
            400,
        ),
        (client.get(url("/v1/models")).bearer_auth(CLIENT_KEY), 200),
        (client.get(url("/v1/models")).bearer_auth(WRONG_KEY), 401),
        (client.get(url("/v1/usage")).bearer_auth(CLIENT_KEY), 503),
        (client.get(url("/readyz")), 200),
        (client.get(url("/healthz")).bearer_auth(WRONG_KEY), 200),
        (client.get(url("/metrics")), 200),
    ];
    for (request, status) in requests {
        let response = request.send().await.expect("an answer");
        answers.push_str(&format!("{:?}\n", response.headers()));
        assert_eq!(response.status(), status, "{answers}");
        answers.push_str(&response.text().await.expect("a body"));
        answers.push('\n');
    }
    assert!(answers.contains("iris_requests_total"), "{answers}");
    assert_eq!(upstream.received().len(), 2, "the mock got both chats");

    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill")
            .success()
    );
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert_eq!(status.code(), Some(0));
    let stderr = stderr_reader.join().expect("stderr");
    let stdout = stdout_reader.join().expect("stdout");
    // Trace level really was on, and the failures were logged: a search of
    // nothing would find nothing.
    assert!(
        stderr.contains("TRACE") || stderr.contains(r#""level":"TRACE""#),
        "no trace lines:\n{stderr}"
    );
    for expected in ["upstream request failed", "request", "stopped"] {
        assert!(
            stderr.contains(expected),
            "{expected:?} not logged:\n{stderr}"
        );
    }
    format!("{stdout}\n{stderr}\n{answers}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_is_printed_at_trace_level_in_any_output() {
    for format in ["text", "json"] {
        let said = everything_iris_said(format).await;
        for secret in [CLIENT_KEY, WRONG_KEY, UPSTREAM_KEY, REDIS_PASSWORD] {
            assert!(
                !said.contains(secret),
                "{format} logs: {secret} was printed:\n{}",
                said.lines()
                    .filter(|l| l.contains(secret))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
}
