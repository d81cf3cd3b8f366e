//! Deployments and `[routing]` in the config: `iris check` reports every
//! mistake with its key path, `iris serve` refuses to start on one, and a
//! correct config passes.

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::support::{iris_command, write_config};

/// `iris check` on `config`: its exit code and stdout.
fn check(config: &str) -> (Option<i32>, String) {
    let file = write_config(config);
    let output = iris_command()
        .args(["check", "--config"])
        .arg(file.path())
        .output()
        .expect("run iris check");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

const UPSTREAMS: &str = r#"
[[upstreams]]
name = "u"
base_url = "http://127.0.0.1:9/v1"

[[upstreams]]
name = "v"
base_url = "http://127.0.0.1:9/v1"
"#;

#[test]
fn check_reports_every_deployment_mistake_with_its_key_path() {
    let config = format!(
        r#"{UPSTREAMS}
[[models]]
name = "unknown-upstream"
deployments = [{{ upstream = "u" }}, {{ upstream = "x" }}]

[[models]]
name = "bad-weights"
deployments = [{{ upstream = "u", weight = 0 }}, {{ upstream = "v" }}]

[[models]]
name = "duplicate"
deployments = [
  {{ upstream = "u", upstream_model = "a" }},
  {{ upstream = "v", upstream_model = "a" }},
  {{ upstream = "u", upstream_model = "a", priority = 1 }},
]

[[models]]
name = "both"
upstream = "u"
deployments = [{{ upstream = "v" }}]

[[models]]
name = "neither"
"#
    );
    let (code, text) = check(&config);
    assert_eq!(code, Some(1), "{text}");
    for expected in [
        "models[0].deployments[1].upstream: no upstream named \"x\"",
        "models[1].deployments[0].weight: must be 1 or more",
        "models[2].deployments[2]: duplicate deployment (same upstream and upstream_model)",
        "models[3]: set upstream or deployments, not both",
        "models[4].upstream: required (or deployments)",
    ] {
        assert!(
            text.lines().any(|l| l == expected),
            "missing {expected:?} in:\n{text}"
        );
    }
    assert!(
        !text.contains("models[2].deployments[1]"),
        "another upstream with the same model name is no duplicate:\n{text}"
    );
}

#[test]
fn check_refuses_a_negative_weight_with_its_key_path() {
    let config = format!(
        "{UPSTREAMS}\n[[models]]\nname = \"m\"\ndeployments = [{{ upstream = \"u\" }}, {{ upstream = \"v\", weight = -1 }}]\n"
    );
    let (code, text) = check(&config);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("models[0].deployments[1].weight: ")),
        "{text}"
    );
}

#[test]
fn check_passes_deployments_the_shorthand_and_every_routing_key() {
    let config = format!(
        r#"{UPSTREAMS}
[[models]]
name = "one"
upstream = "u"
upstream_model = "one-there"

[[models]]
name = "many"
deployments = [
  {{ upstream = "u", upstream_model = "m", weight = 2 }},
  {{ upstream = "v", upstream_model = "m", weight = 1, priority = 0 }},
  {{ upstream = "u", upstream_model = "fallback", priority = 1 }},
]

[routing]
retries = 2
retry_on = ["connect", "timeout", 401, 403, 429, 500, 502, 503, 504]
backoff_ms = 100
max_retry_wait_ms = 10000
allowed_fails = 3
cooldown_ms = 30000
max_queue_ms = 0
"#
    );
    let (code, text) = check(&config);
    assert_eq!(code, Some(0), "{text}");

    // Upstream pacing keys too.
    let paced = config.replacen(
        "name = \"u\"\n",
        "name = \"u\"\nrequests_per_minute = 600\ntokens_per_minute = 200000\nmax_concurrent = 32\n",
        1,
    );
    let (code, text) = check(&paced);
    assert_eq!(code, Some(0), "{text}");
}

#[test]
fn check_refuses_unknown_routing_keys() {
    let config = format!("{UPSTREAMS}\n[routing]\nretrys = 2\n");
    let (code, text) = check(&config);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.lines().any(|l| l == "routing.retrys: unknown key"),
        "{text}"
    );
}

#[test]
fn serve_refuses_to_start_on_a_deployment_naming_an_unknown_upstream() {
    let config = write_config(&format!(
        r#"{UPSTREAMS}
[server]
listen = "127.0.0.1:0"

[store]
kind = "memory"

[[models]]
name = "m"
deployments = [{{ upstream = "u" }}, {{ upstream = "x" }}]
"#
    ));
    let mut child = iris_command()
        .args(["serve", "--config"])
        .arg(config.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn iris serve");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("iris serve started on a config with an unknown upstream");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = child.wait_with_output().expect("output");
    assert!(!status.success());
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        said.contains("models[0].deployments[1].upstream: no upstream named \\\"x\\\"")
            || said.contains("models[0].deployments[1].upstream: no upstream named \"x\""),
        "{said}"
    );
}
