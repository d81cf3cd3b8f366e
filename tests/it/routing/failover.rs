//! Retries before the first byte: on which failures, to which deployment,
//! how many, how long (Retry-After, the overall timeout), what the client
//! sees when every attempt failed, garbage 200s, and what is logged.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Config, ask_at, assert_answered, attempts_metric, chat, farm, metric, stream};
use crate::support::mock_upstream::{Fault, refused_base_url};
use crate::support::{KEY_A, KEY_B, chat_body, http, write_config};

/// Retries without waiting on backoff, so counts, not clocks, are tested.
const QUICK: &str = "backoff_ms = 1";

#[tokio::test]
async fn a_503_fails_over_to_the_other_deployment() {
    let [a, b] = farm().await;
    let iris = Config::new()
        .upstream("fo503-a", &a.base_url(), "")
        .upstream("fo503-b", &b.base_url(), "")
        .model("fo503", &[("fo503-a", ""), ("fo503-b", "")])
        .routing(QUICK)
        .routing("allowed_fails = 1000")
        .start()
        .await;
    a.fail_always(Fault::status(503));
    let mut second_attempts = 0;
    for _ in 0..20 {
        let reply = chat(&iris, "fo503").await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        assert_eq!(reply.upstream(), "fo503-b");
        assert_eq!(
            reply.json()["choices"][0]["message"]["content"],
            "Hello from the mock upstream."
        );
        match reply.attempts() {
            1 => {}
            2 => second_attempts += 1,
            n => panic!("{n} attempts with one deployment failing"),
        }
    }
    assert_eq!(b.requests(), 20, "every request answered by b, once");
    assert_eq!(
        a.requests(),
        second_attempts,
        "each request that tried a first took a second attempt on b"
    );
    assert!(
        a.requests() >= 1,
        "equal weights: a was never chosen first in 20 requests"
    );
    assert_eq!(
        attempts_metric(&iris, "fo503-a", "503").await,
        a.requests() as f64
    );
    assert_eq!(attempts_metric(&iris, "fo503-b", "ok").await, 20.0);
}

#[tokio::test]
async fn a_stream_fails_over_before_its_first_byte() {
    let [a, b] = farm().await;
    let iris = Config::new()
        .upstream("fostream-a", &a.base_url(), "")
        .upstream("fostream-b", &b.base_url(), "")
        .model(
            "fostream",
            &[("fostream-a", ""), ("fostream-b", "priority = 1")],
        )
        .routing(QUICK)
        .start()
        .await;
    a.fail_next(1, Fault::status(502));
    let reply = stream(&iris, "fostream").await;
    assert_answered(&reply, "fostream-b", 2);
    assert_eq!(reply.header("content-type"), Some("text/event-stream"));
    assert_eq!(reply.streamed_content(), "word0 word1 word2 ");
    assert!(reply.text.ends_with("data: [DONE]\n\n"), "{}", reply.text);
    assert!(
        !reply.text.contains("mock_error"),
        "nothing of the failed attempt reaches the client"
    );
    assert_eq!((a.requests(), b.requests()), (1, 1));
}

#[tokio::test]
async fn refused_reset_and_stopped_upstreams_fail_over() {
    let [a, b, c] = farm().await;
    let iris = Config::new()
        .upstream("foconn-dead", &refused_base_url(), "")
        .upstream("foconn-a", &a.base_url(), "")
        .upstream("foconn-b", &b.base_url(), "")
        .upstream("foconn-c", &c.base_url(), "")
        .model(
            "foconn-refused",
            &[("foconn-dead", ""), ("foconn-c", "priority = 1")],
        )
        .model(
            "foconn-reset",
            &[("foconn-a", ""), ("foconn-c", "priority = 1")],
        )
        .model(
            "foconn-stopped",
            &[("foconn-b", ""), ("foconn-c", "priority = 1")],
        )
        .routing(QUICK)
        .start()
        .await;

    assert_answered(&chat(&iris, "foconn-refused").await, "foconn-c", 2);
    assert!(attempts_metric(&iris, "foconn-dead", "connect").await >= 1.0);

    a.fail_next(1, Fault::Reset);
    assert_answered(&chat(&iris, "foconn-reset").await, "foconn-c", 2);
    assert_eq!(a.requests(), 1);
    assert!(attempts_metric(&iris, "foconn-a", "connect").await >= 1.0);

    // b answers once (Iris now holds a pooled connection to it), then stops.
    assert_answered(&chat(&iris, "foconn-stopped").await, "foconn-b", 1);
    b.stop().await;
    assert_answered(&chat(&iris, "foconn-stopped").await, "foconn-c", 2);
    assert_eq!(b.requests(), 1);
    assert_eq!(c.requests(), 3);
}

#[tokio::test]
async fn other_4xx_answers_are_passed_through_without_a_retry() {
    let [a, b] = farm().await;
    let iris = Config::new()
        .upstream("fo4xx-a", &a.base_url(), "")
        .upstream("fo4xx-b", &b.base_url(), "")
        .model("fo4xx", &[("fo4xx-a", ""), ("fo4xx-b", "priority = 1")])
        .routing(QUICK)
        .start()
        .await;
    for status in [400, 404, 409, 413, 422] {
        a.fail_next(1, Fault::status(status));
        let reply = chat(&iris, "fo4xx").await;
        assert_eq!(reply.status, status, "{}", reply.text);
        assert_eq!(
            reply.json()["error"]["code"],
            "mock_error",
            "the upstream's body"
        );
        assert_eq!((reply.upstream(), reply.attempts()), ("fo4xx-a", 1));
    }
    assert_eq!(a.requests(), 5);
    assert_eq!(b.requests(), 0, "a 4xx is never retried elsewhere");
    assert_eq!(attempts_metric(&iris, "fo4xx-a", "400").await, 1.0);
}

#[tokio::test]
async fn retry_on_decides_which_failures_are_retried() {
    let [a, b] = farm().await;
    let iris = Config::new()
        .upstream("foron-a", &a.base_url(), "")
        .upstream("foron-b", &b.base_url(), "")
        .model("foron", &[("foron-a", ""), ("foron-b", "priority = 1")])
        .routing(QUICK)
        .routing(r#"retry_on = ["connect", 429]"#)
        .start()
        .await;
    a.fail_next(1, Fault::status(503));
    let reply = chat(&iris, "foron").await;
    assert_eq!(reply.status, 503, "503 is not in retry_on: passed through");
    assert_eq!((reply.upstream(), reply.attempts()), ("foron-a", 1));
    assert_eq!(b.requests(), 0);

    a.fail_next(1, Fault::retry_after_ms(10));
    assert_answered(&chat(&iris, "foron").await, "foron-b", 2);
}

#[tokio::test]
async fn retries_bound_the_attempts_and_the_last_error_is_passed_through() {
    let [a] = farm().await;
    let iris = Config::new()
        .upstream("forty-a", &a.base_url(), "")
        .upstream("forty-dead", &refused_base_url(), "")
        .single("forty", "forty-a")
        .single("forty-dead", "forty-dead")
        .routing(QUICK)
        .routing("retries = 2\nallowed_fails = 1000")
        .start()
        .await;

    // Two failures, then an answer: the one deployment tried three times.
    a.fail_next(1, Fault::status(500));
    a.fail_next(1, Fault::status(502));
    assert_answered(&chat(&iris, "forty").await, "forty-a", 3);
    assert_eq!(a.requests(), 3);

    // Every attempt fails: the last upstream error, as the upstream sent it.
    a.fail_next(2, Fault::status(500));
    a.fail_next(1, Fault::status(503));
    let reply = chat(&iris, "forty").await;
    assert_eq!(reply.status, 503, "{}", reply.text);
    assert_eq!(reply.json()["error"]["code"], "mock_error");
    assert_eq!((reply.upstream(), reply.attempts()), ("forty-a", 3));
    assert_eq!(a.requests(), 6, "retries = 2: three attempts, no more");

    // None answered: Iris's own 502, still naming what it tried.
    let reply = chat(&iris, "forty-dead").await;
    assert_eq!(reply.status, 502, "{}", reply.text);
    assert_eq!(reply.error()["code"], "upstream_unavailable");
    assert_eq!((reply.upstream(), reply.attempts()), ("forty-dead", 3));
    assert!(!reply.text.contains("secret-forty"), "{}", reply.text);
}

#[tokio::test]
async fn a_hung_upstream_times_out_within_its_timeout_overall() {
    let [a] = farm().await;
    let iris = Config::new()
        .upstream("fohang-a", &a.base_url(), "timeout_ms = 1000")
        .single("fohang", "fohang-a")
        .routing(QUICK)
        .routing("retries = 4\nallowed_fails = 1000")
        .start()
        .await;
    a.fail_always(Fault::Hang);
    let reply = chat(&iris, "fohang").await;
    assert_eq!(reply.status, 504, "{}", reply.text);
    assert_eq!(reply.error()["code"], "upstream_timeout");
    assert_eq!(reply.upstream(), "fohang-a");
    assert!(
        reply.elapsed >= Duration::from_millis(900),
        "{:?}",
        reply.elapsed
    );
    // Five attempts of a second each would take five seconds: the retries
    // share the upstream's one timeout.
    assert!(
        reply.elapsed < Duration::from_millis(3500),
        "retries stay within timeout_ms overall: {:?}",
        reply.elapsed
    );
    assert!(attempts_metric(&iris, "fohang-a", "timeout").await >= 1.0);
}

/// The time between the last two requests `mock` received.
fn last_gap(mock: &crate::support::MockUpstream) -> Duration {
    let received = mock.received();
    let [.., before, last] = received.as_slice() else {
        panic!("fewer than two requests");
    };
    last.at - before.at
}

#[tokio::test]
async fn retry_after_up_to_max_retry_wait_is_honoured() {
    let [a] = farm().await;
    let iris = Config::new()
        .upstream("forat-a", &a.base_url(), "")
        .single("forat", "forat-a")
        .routing(QUICK)
        .routing("max_retry_wait_ms = 5000")
        .start()
        .await;

    a.fail_next(1, Fault::retry_after_s(1));
    let reply = chat(&iris, "forat").await;
    assert_answered(&reply, "forat-a", 2);
    let gap = last_gap(&a);
    assert!(
        gap >= Duration::from_millis(950),
        "Retry-After: 1 waited for: {gap:?}"
    );

    a.fail_next(1, Fault::retry_after_ms(400));
    let reply = chat(&iris, "forat").await;
    assert_answered(&reply, "forat-a", 2);
    let gap = last_gap(&a);
    assert!(
        gap >= Duration::from_millis(380),
        "retry-after-ms: 400 waited for: {gap:?}"
    );
    assert_eq!(a.requests(), 4);
    assert!(
        metric(
            &iris,
            "iris_upstream_cooldowns_total",
            &["upstream=\"forat-a\"", "reason=\"rate_limited\""]
        )
        .await
            >= 1.0
    );
}

#[tokio::test]
async fn a_longer_retry_after_is_passed_through_without_waiting() {
    let [a] = farm().await;
    let iris = Config::new()
        .upstream("folong-a", &a.base_url(), "")
        .single("folong", "folong-a")
        .routing(QUICK)
        .routing("max_retry_wait_ms = 2000")
        .start()
        .await;
    a.fail_next(1, Fault::retry_after_s(30));
    let reply = chat(&iris, "folong").await;
    assert_eq!(reply.status, 429, "{}", reply.text);
    assert_eq!(reply.json()["error"]["code"], "mock_error");
    assert_eq!(
        reply.header("retry-after"),
        Some("30"),
        "the upstream's Retry-After"
    );
    assert_eq!(a.requests(), 1, "not retried");
    assert!(
        reply.elapsed < Duration::from_millis(1500),
        "not waited for: {:?}",
        reply.elapsed
    );
}

#[tokio::test]
async fn a_rate_limited_deployment_is_left_for_the_other_at_once_and_skipped() {
    let [a, b] = farm().await;
    let iris = Config::new()
        .upstream("fo429-a", &a.base_url(), "")
        .upstream("fo429-b", &b.base_url(), "")
        .model("fo429", &[("fo429-a", ""), ("fo429-b", "priority = 1")])
        .routing(QUICK)
        .start()
        .await;
    a.fail_next(1, Fault::retry_after_s(30));
    let reply = chat(&iris, "fo429").await;
    assert_answered(&reply, "fo429-b", 2);
    assert!(
        reply.elapsed < Duration::from_millis(1500),
        "another deployment is tried without waiting: {:?}",
        reply.elapsed
    );
    // a cools down for its Retry-After (30 s > cooldown_ms): skipped.
    for _ in 0..5 {
        assert_answered(&chat(&iris, "fo429").await, "fo429-b", 1);
    }
    assert_eq!(a.requests(), 1);
    assert_eq!(
        metric(
            &iris,
            "iris_upstream_cooldowns_total",
            &["upstream=\"fo429-a\"", "reason=\"rate_limited\""]
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn a_garbage_200_is_retried_on_the_other_deployment() {
    let [a, b] = farm().await;
    let iris = Config::new()
        .upstream("fogarb-a", &a.base_url(), "")
        .upstream("fogarb-b", &b.base_url(), "")
        .model("fogarb", &[("fogarb-a", ""), ("fogarb-b", "priority = 1")])
        .routing(QUICK)
        .start()
        .await;
    a.fail_next(1, Fault::GarbageJson);
    let reply = chat(&iris, "fogarb").await;
    assert_answered(&reply, "fogarb-b", 2);
    assert!(!reply.text.contains("<html>"), "{}", reply.text);

    a.fail_next(1, Fault::GarbageSse);
    let reply = stream(&iris, "fogarb").await;
    assert_answered(&reply, "fogarb-b", 2);
    assert!(reply.text.ends_with("data: [DONE]\n\n"), "{}", reply.text);
    assert!(!reply.text.contains("<html>"), "{}", reply.text);
    assert_eq!(attempts_metric(&iris, "fogarb-a", "invalid").await, 2.0);
}

#[tokio::test]
async fn a_garbage_200_alone_is_a_clear_502() {
    let [a] = farm().await;
    let iris = Config::new()
        .upstream("fogarb1-a", &a.base_url(), "")
        .single("fogarb1", "fogarb1-a")
        .routing(QUICK)
        .start()
        .await;
    a.fail_always(Fault::GarbageJson);
    let reply = chat(&iris, "fogarb1").await;
    assert_eq!(reply.status, 502, "{}", reply.text);
    let error = reply.error();
    assert_eq!(error["code"], "upstream_unavailable");
    assert!(
        error["message"].as_str().is_some_and(|m| m.len() > 10),
        "{error}"
    );

    a.fail_always(Fault::GarbageSse);
    let reply = stream(&iris, "fogarb1").await;
    assert_eq!(
        reply.status, 502,
        "checked before anything reaches the client: {}",
        reply.text
    );
    assert_eq!(reply.error()["code"], "upstream_unavailable");
    assert!(!reply.text.contains("<html>"));
    assert!(attempts_metric(&iris, "fogarb1-a", "invalid").await >= 2.0);
}

#[tokio::test]
async fn the_iris_headers_name_the_upstream_and_count_the_attempts() {
    let [a, b] = farm().await;
    let iris = Config::new()
        .upstream("fohdr-a", &a.base_url(), "")
        .upstream("fohdr-b", &b.base_url(), "")
        .model("fohdr", &[("fohdr-a", ""), ("fohdr-b", "priority = 1")])
        .single("fohdr-one", "fohdr-b")
        .routing(QUICK)
        .start()
        .await;
    assert_answered(&chat(&iris, "fohdr").await, "fohdr-a", 1);
    assert_answered(&stream(&iris, "fohdr").await, "fohdr-a", 1);
    assert_answered(&chat(&iris, "fohdr-one").await, "fohdr-b", 1);
    a.fail_next(1, Fault::status(500));
    assert_answered(&chat(&iris, "fohdr").await, "fohdr-b", 2);
    a.fail_next(1, Fault::status(400));
    let reply = chat(&iris, "fohdr").await;
    assert_eq!(
        (reply.status, reply.upstream(), reply.attempts()),
        (400, "fohdr-a", 1)
    );
}

#[tokio::test]
async fn an_upstream_403_cools_the_deployment_too() {
    let [a, b] = farm().await;
    let iris = Config::new()
        .upstream("fo403-a", &a.base_url(), "")
        .upstream("fo403-b", &b.base_url(), "")
        .model("fo403", &[("fo403-a", ""), ("fo403-b", "priority = 1")])
        .routing(QUICK)
        .start()
        .await;
    a.fail_always(Fault::status(403));
    assert_answered(&chat(&iris, "fo403").await, "fo403-b", 2);
    for _ in 0..5 {
        assert_answered(&chat(&iris, "fo403").await, "fo403-b", 1);
    }
    assert_eq!(a.requests(), 1, "one 403 is enough: Iris's key is refused");
    assert_eq!(
        metric(
            &iris,
            "iris_upstream_cooldowns_total",
            &["upstream=\"fo403-a\"", "reason=\"auth\""]
        )
        .await,
        1.0
    );
}

// --- what is logged --------------------------------------------------------

/// `iris serve` as a child process with JSON logs, killed on drop.
struct Served {
    base: String,
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    _config: tempfile::NamedTempFile,
}

impl Served {
    async fn start(config: &str) -> Self {
        use std::io::BufRead as _;
        let file = write_config(config);
        let mut child = crate::support::iris_command()
            .args(["serve", "--config"])
            .arg(file.path())
            .env("IRIS_LOG", "info")
            .env("IRIS_LOG_FORMAT", "json")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn iris serve");
        let stderr = child.stderr.take().expect("stderr");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                sink.lock().unwrap().push(line);
            }
        });
        let mut served = Self {
            base: String::new(),
            child,
            lines,
            _config: file,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let listen = served.logs().iter().find_map(|line| {
                (line["message"] == "iris is serving")
                    .then(|| line["listen"].as_str().map(String::from))?
            });
            if let Some(listen) = listen {
                served.base = format!("http://{listen}");
                return served;
            }
            let exited = served.child.try_wait().expect("wait");
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "iris did not start ({exited:?}): {:?}",
                served.lines.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn raw(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    fn logs(&self) -> Vec<Value> {
        self.raw()
            .iter()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    async fn metrics(&self) -> String {
        http()
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics")
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Log lines at `level` that contain `text` anywhere.
fn lines_with(logs: &[String], level: &str, text: &str) -> usize {
    logs.iter()
        .filter(|line| {
            serde_json::from_str::<Value>(line).is_ok_and(|l| l["level"] == level)
                && line.contains(text)
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_401_cools_the_deployment_and_is_logged_once_without_the_key() {
    let [a, b] = farm().await;
    let config = Config::new()
        .upstream("auth-a", &a.base_url(), "")
        .upstream("auth-b", &b.base_url(), "")
        .model("auth", &[("auth-a", ""), ("auth-b", "priority = 1")])
        .routing(QUICK)
        .text();
    let iris = Served::start(&config).await;
    a.fail_always(Fault::status(401));

    let first = ask_at(
        &iris.base,
        KEY_A,
        &chat_body("auth"),
        &[("x-request-id", "rt-auth-1")],
    )
    .await;
    assert_answered(&first, "auth-b", 2);
    assert_eq!(first.header("x-request-id"), Some("rt-auth-1"));
    for i in 2..=5 {
        let id = format!("rt-auth-{i}");
        let reply = ask_at(
            &iris.base,
            KEY_B,
            &chat_body("auth"),
            &[("x-request-id", &id)],
        )
        .await;
        assert_answered(&reply, "auth-b", 1);
    }
    assert_eq!(
        a.requests(),
        1,
        "a cooled down on its 401: Iris's key is wrong"
    );

    // A failed attempt on b, retried on b (a is cooling): one warn line.
    b.fail_next(1, Fault::status(503));
    let reply = ask_at(
        &iris.base,
        KEY_A,
        &chat_body("auth"),
        &[("x-request-id", "rt-auth-6")],
    )
    .await;
    assert_answered(&reply, "auth-b", 2);

    let metrics = iris.metrics().await;
    assert_eq!(
        crate::support::metric_sum(
            &metrics,
            "iris_upstream_cooldowns_total",
            &["upstream=\"auth-a\"", "reason=\"auth\""]
        ),
        1.0,
        "{metrics}"
    );
    // Logs are written as they happen; give the reader thread a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let logs = iris.raw();
    let all = logs.join("\n");
    assert_eq!(
        lines_with(&logs, "ERROR", "auth-a"),
        1,
        "one error naming the upstream whose key was refused:\n{all}"
    );
    assert!(
        lines_with(&logs, "WARN", "rt-auth-1") + lines_with(&logs, "ERROR", "rt-auth-1") >= 1,
        "the failed attempt is logged with its request id:\n{all}"
    );
    assert_eq!(
        lines_with(&logs, "WARN", "rt-auth-6"),
        1,
        "one warn line per failed attempt, with the request id:\n{all}"
    );
    for i in 2..=5 {
        assert_eq!(
            lines_with(&logs, "WARN", &format!("rt-auth-{i}\"")),
            0,
            "{all}"
        );
    }
    for secret in ["secret-auth-a", "secret-auth-b", KEY_A, KEY_B] {
        assert!(!all.contains(secret), "a key in the logs:\n{all}");
        assert!(!metrics.contains(secret), "a key in the metrics");
    }
}
