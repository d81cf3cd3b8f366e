//! The `iris` binary as users and scripts run it: commands, exit codes, logs,
//! and a clean exit on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::{
    KEY_A, MockUpstream, base_config, chat_body, http, iris_command as iris, write_config,
};

/// Kills the server if the test fails before stopping it.
struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn key_new_prints_a_key_and_its_hash() {
    let output = iris().args(["key", "new"]).output().expect("run");
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).expect("utf8");
    let key = text
        .lines()
        .find_map(|l| l.strip_prefix("key:"))
        .expect("key line")
        .trim();
    let hash = text
        .lines()
        .find_map(|l| l.strip_prefix("hash:"))
        .expect("hash line")
        .trim();
    let rehashed = iris().args(["key", "hash", key]).output().expect("run");
    assert_eq!(
        String::from_utf8(rehashed.stdout).expect("utf8").trim(),
        hash
    );
}

#[test]
fn key_hash_matches_sha256() {
    let output = iris().args(["key", "hash", "test"]).output().expect("run");
    assert_eq!(
        String::from_utf8(output.stdout).expect("utf8").trim(),
        "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    );
}

#[test]
fn check_lists_every_problem_with_its_key_path() {
    let config = write_config(
        r#"
[server]
listen = "nowhere"
[[upstreams]]
name = "u"
base_url = "http://u/v1"
api_key = "${IRIS_TEST_UNSET_VARIABLE}"
colour = "blue"
[[models]]
name = "m"
upstream = "x"
"#,
    );
    let output = iris()
        .args(["check", "--config"])
        .arg(config.path())
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(1));
    let text = String::from_utf8(output.stdout).expect("utf8");
    for expected in [
        "server.listen: \"nowhere\" is not a host:port address",
        "upstreams[0].api_key: environment variable IRIS_TEST_UNSET_VARIABLE is not set",
        "upstreams[0].colour: unknown key",
        "models[0].upstream: no upstream named \"x\"",
    ] {
        assert!(
            text.lines().any(|l| l == expected),
            "missing {expected:?} in:\n{text}"
        );
    }
}

#[test]
fn check_reads_cluster_and_sentinel_urls_and_never_prints_their_passwords() {
    let check = |url: &str| {
        let config = write_config(&format!(
            r#"
[store]
kind = "redis"
url = "{url}"
[[upstreams]]
name = "u"
base_url = "http://u/v1"
api_key = "k"
[[models]]
name = "m"
upstream = "u"
"#
        ));
        let output = iris()
            .args(["check", "--config"])
            .arg(config.path())
            .output()
            .expect("run");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(!text.contains("hunter2"), "{text}");
        (output.status.code(), text)
    };
    for good in [
        "redis+cluster://iris:hunter2@10.0.0.1:7000,10.0.0.2:7000/",
        "rediss+sentinel://:hunter2@s1:26379,s2:26379/mymaster/1?sentinel_password=hunter2",
    ] {
        let (code, text) = check(good);
        assert_eq!(code, Some(0), "{good}: {text}");
    }
    for (bad, expected) in [
        (
            "redis+cluster://:hunter2@10.0.0.1:7000/5",
            "store.url: a Redis Cluster has only database 0",
        ),
        (
            "redis+sentinel://:hunter2@s1:26379,s2:hunter2/mymaster",
            "store.url: host 2: the port is not a number",
        ),
    ] {
        let (code, text) = check(bad);
        assert_eq!(code, Some(1), "{bad}: {text}");
        assert!(text.contains(expected), "{bad}: {text}");
    }
}

#[test]
fn check_passes_the_shipped_configs() {
    let root = env!("CARGO_MANIFEST_DIR");
    let hash = "sha256:0ac1b2d84debab3bafdb52b26fd82c794da150ebfd2b41d437c6595891c4490a";
    for file in [
        "iris.toml",
        "examples/viktor.toml",
        "examples/tsystems.toml",
        "examples/novita.toml",
        "examples/llm7.toml",
    ] {
        let output = iris()
            .args(["check", "--config"])
            .arg(format!("{root}/config/{file}"))
            .env("VIKTOR_API_KEY", "x")
            .env("TSYSTEMS_API_KEY", "x")
            .env("NOVITA_API_KEY", "x")
            .env("TEAM_A_KEY_HASH", hash)
            .env("MY_KEY_HASH", hash)
            .output()
            .expect("run");
        assert!(
            output.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&output.stdout)
        );
    }
}

#[test]
fn the_config_path_comes_from_iris_config_when_not_given() {
    let config = write_config("[server]\nlisten = \"bad\"\n");
    let output = iris()
        .arg("check")
        .env("IRIS_CONFIG", config.path())
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stdout).contains("server.listen"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_logs_json_without_keys_and_exits_cleanly_on_sigterm() {
    let upstream = MockUpstream::start().await;
    let config = write_config(&base_config(&upstream.base_url(), ""));
    let child = iris()
        .args(["serve", "--config"])
        .arg(config.path())
        .env("IRIS_LOG", "debug")
        .env("IRIS_LOG_FORMAT", "json")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut child = KillOnDrop(Some(child));
    let stderr = child
        .0
        .as_mut()
        .and_then(|c| c.stderr.take())
        .expect("stderr");
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });

    let mut logs = Vec::new();
    let addr = loop {
        let line = lines_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("iris starts");
        let json: serde_json::Value = serde_json::from_str(&line).expect("log lines are JSON");
        logs.push(line);
        if json["message"] == "iris is serving" {
            break json["listen"].as_str().expect("listen field").to_owned();
        }
    };

    let client = http();
    let response = client
        .post(format!("http://{addr}/v1/chat/completions"))
        .bearer_auth(KEY_A)
        .json(&chat_body("test-model"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    let wrong = client
        .post(format!("http://{addr}/v1/chat/completions"))
        .bearer_auth("not-a-real-key-123")
        .json(&chat_body("test-model"))
        .send()
        .await
        .expect("request");
    assert_eq!(wrong.status(), 401);
    let models = client
        .get(format!("http://{addr}/v1/models"))
        .bearer_auth(KEY_A)
        .send()
        .await
        .expect("request");
    assert_eq!(models.status(), 200);

    let mut child = child.0.take().expect("child");
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0");
    logs.extend(lines_rx.try_iter());

    let request_line = logs
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .find(|l| l["message"] == "request" && l["status"] == 200)
        .expect("a request log line");
    assert_eq!(request_line["client"], "a");
    assert_eq!(request_line["model"], "test-model");
    assert!(
        request_line["request_id"]
            .as_str()
            .is_some_and(|id| !id.is_empty())
    );
    assert!(request_line["upstream_ms"].as_f64().is_some());
    assert!(request_line["total_ms"].as_f64().is_some());
    let models_line = logs
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .find(|l| l["message"] == "request" && l["route"] == "/v1/models")
        .expect("a log line for GET /v1/models");
    assert_eq!(models_line["client"], "a", "every route logs its client");
    let all = logs.join("\n");
    for secret in [KEY_A, "not-a-real-key-123", "upstream-secret-key"] {
        assert!(!all.contains(secret), "a key appeared in the logs");
    }
}
