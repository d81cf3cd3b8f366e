//! Secrets are never printed: the real `iris` binary at `IRIS_LOG=trace`
//! (plain and JSON logs), driven through successes and failures (an
//! upstream 401 that echoes its key among them), and every
//! byte it wrote (stdout, stderr), served (`/metrics`, every response's
//! head and body but the two that hand a managed client its key) or sent on
//! shutdown is searched for each secret: a config client's key, a wrong
//! key, the admin key and a wrong one, a managed client's key and its
//! rotated successor, the upstream's key, and the password in the Redis
//! URL. Two runs: one on a Redis that cannot be reached (loopback port 1:
//! nothing leaves the machine), one on the memory store, where managed
//! clients can be created.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::{self, MockUpstream};
use iris::keys::KeyHash;

const CLIENT_KEY: &str = "iris-client-key-0f3c9a7e51";
const WRONG_KEY: &str = "iris-wrong-key-6d2b8c4a90";
const UPSTREAM_KEY: &str = "sk-upstream-key-4e7a1b9c22";
const REDIS_PASSWORD: &str = "redis-password-8b5d3f1a77";
const ADMIN_KEY: &str = "iris-admin-key-3a9e5c7b13";
const WRONG_ADMIN_KEY: &str = "iris-wrong-admin-key-7c1f2e";

/// Port 1 on loopback: refused at once, so the store is unavailable and
/// requests are counted locally. (The spend log off: beside Redis it would
/// be a file in the working directory.)
fn unreachable_redis() -> String {
    format!(
        "kind = \"redis\"\nurl = \"redis://:{REDIS_PASSWORD}@127.0.0.1:1/13\"\n\
         on_unavailable = \"allow\"\ntimeout_ms = 200\n\n[spend_log]\nkind = \"off\"\n"
    )
}

fn config(upstream: &str, store: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
shutdown_grace_ms = 2000

[store]
{store}

[admin]
key = "{admin}"

[[upstreams]]
name = "mock"
base_url = "{upstream}"
api_key = "{UPSTREAM_KEY}"
timeout_ms = 2000

# The same mock, which refuses Iris's key and echoes it back
# (`x-mock-echo-auth`): its own name, so its cooldown is its own.
[[upstreams]]
name = "refusing"
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
name = "refused-model"
upstream = "refusing"

[[models]]
name = "gone-model"
upstream = "gone"

[[clients]]
name = "a"
key = "{key}"
"#,
        key = KeyHash::of(CLIENT_KEY),
        admin = KeyHash::of(ADMIN_KEY),
    )
}

/// Runs `iris serve` with `format` logs at trace level on `store`, sends
/// requests of every kind through it (managed clients too when `managed`),
/// stops it with SIGTERM and returns everything it printed and answered,
/// with the managed keys it handed out.
async fn everything_iris_said(format: &str, store: &str, managed: bool) -> (String, Vec<String>) {
    let upstream = MockUpstream::start().await;
    let file = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("temp file");
    std::fs::write(file.path(), config(&upstream.base_url(), store)).expect("write config");
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
    let refused = serde_json::json!({"model": "refused-model", "messages": [{"role": "user", "content": "Hello"}]});
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
        // A 401 whose body hands back the upstream's key: 502 for the
        // client, the body in the log with the key masked.
        (
            client
                .post(url("/v1/chat/completions"))
                .bearer_auth(CLIENT_KEY)
                .header("x-mock-echo-auth", "401")
                .json(&refused),
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
        // Only the store that cannot be reached has no usage to show.
        (
            client.get(url("/v1/usage")).bearer_auth(CLIENT_KEY),
            if managed { 200 } else { 503 },
        ),
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
    let admin = [
        (
            client.get(url("/admin/clients")).bearer_auth(ADMIN_KEY),
            200,
        ),
        (
            client
                .get(url("/admin/clients"))
                .bearer_auth(WRONG_ADMIN_KEY),
            401,
        ),
        (
            client.get(url("/admin/upstreams")).bearer_auth(ADMIN_KEY),
            200,
        ),
        (
            client.get(url("/admin/clients")).bearer_auth(CLIENT_KEY),
            401,
        ),
    ];
    for (request, status) in admin {
        let response = request.send().await.expect("an answer");
        answers.push_str(&format!("{:?}\n", response.headers()));
        assert_eq!(response.status(), status, "{answers}");
        answers.push_str(&response.text().await.expect("a body"));
        answers.push('\n');
    }
    let mut handed_out = Vec::new();
    if managed {
        // The key is in these two answers' bodies by design: their heads
        // are searched, their bodies not.
        for (path, body) in [
            ("/admin/clients", r#"{"name": "managed"}"#),
            ("/admin/clients/managed/rotate", r#"{"grace_s": 60}"#),
        ] {
            let response = client
                .post(url(path))
                .bearer_auth(ADMIN_KEY)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .expect("an answer");
            answers.push_str(&format!("{:?}\n", response.headers()));
            assert!(
                response.status().is_success(),
                "{path}: {}",
                response.status()
            );
            let json: serde_json::Value = response.json().await.expect("json");
            handed_out.push(json["key"].as_str().expect("a key").to_owned());
        }
        for key in &handed_out {
            let mut works = false;
            for _ in 0..100 {
                let response = client
                    .post(url("/v1/chat/completions"))
                    .bearer_auth(key)
                    .json(&chat)
                    .send()
                    .await
                    .expect("an answer");
                answers.push_str(&format!("{:?}\n", response.headers()));
                works = response.status() == 200;
                answers.push_str(&response.text().await.expect("a body"));
                if works {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(works, "a managed key works");
        }
    }
    let metrics = client.get(url("/metrics")).send().await.expect("metrics");
    answers.push_str(&metrics.text().await.expect("a body"));
    assert!(answers.contains("iris_requests_total"), "{answers}");
    // The refused request is attempted three times (two retries).
    let chats = if managed { 7 } else { 5 };
    assert_eq!(upstream.received().len(), chats, "the mock got every chat");

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
    for expected in [
        "upstream request failed",
        "request",
        "stopped",
        // The refusal's body, its echoed key masked.
        "the upstream refused Iris's API key",
        "We received `Authorization: Bearer ***`",
    ] {
        assert!(
            stderr.contains(expected),
            "{expected:?} not logged:\n{stderr}"
        );
    }
    (format!("{stdout}\n{stderr}\n{answers}"), handed_out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_is_printed_at_trace_level_in_any_output() {
    for (format, store, managed) in [
        ("text", unreachable_redis(), false),
        ("json", "kind = \"memory\"".to_owned(), true),
    ] {
        let (said, handed_out) = everything_iris_said(format, &store, managed).await;
        let fixed = [
            CLIENT_KEY,
            WRONG_KEY,
            UPSTREAM_KEY,
            REDIS_PASSWORD,
            ADMIN_KEY,
            WRONG_ADMIN_KEY,
        ];
        for secret in fixed
            .iter()
            .copied()
            .chain(handed_out.iter().map(String::as_str))
        {
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
