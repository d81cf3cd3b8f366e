//! Budget alerts through the real server: a receiver on 127.0.0.1 port 0
//! gets the webhook's POSTs; thresholds are crossed with the mock
//! upstream's reported usage (`x-mock-usage`).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use iris::keys::KeyHash;
use serde_json::{Value, json};
use sha2::Sha256;

use crate::support::redis::{SharedRedis, with_store};
use crate::support::{Iris, MockUpstream, base_config, chat_body, eventually, iris_command};

const KEY_C: &str = "test-key-c";
const SECRET: &str = "alert-secret-7f3a";
/// What the mock upstream reports for every request here: 20 tokens.
const USAGE: &str = r#"{"prompt_tokens":10,"completion_tokens":10,"total_tokens":20}"#;

/// One POST the receiver got.
#[derive(Debug, Clone)]
struct Received {
    body: Bytes,
    signature: Option<String>,
    at: Instant,
}

/// How the receiver answers.
enum Answer {
    /// These statuses in turn, then 200.
    Statuses(Mutex<VecDeque<u16>>),
    /// Never.
    Hang,
    /// 307 to this URL.
    Redirect(String),
}

/// A webhook receiver on 127.0.0.1, port 0.
struct Receiver {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    async fn start(answer: Answer) -> Self {
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let answer = Arc::new(answer);
        let log = Arc::clone(&received);
        let router = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let log = Arc::clone(&log);
                let answer = Arc::clone(&answer);
                async move {
                    log.lock().unwrap().push(Received {
                        body,
                        signature: headers
                            .get("x-iris-signature")
                            .map(|v| v.to_str().unwrap().to_owned()),
                        at: Instant::now(),
                    });
                    match &*answer {
                        Answer::Hang => std::future::pending::<axum::response::Response>().await,
                        Answer::Statuses(statuses) => {
                            let status = statuses.lock().unwrap().pop_front().unwrap_or(200);
                            axum::response::IntoResponse::into_response(
                                StatusCode::from_u16(status).unwrap(),
                            )
                        }
                        Answer::Redirect(to) => axum::response::IntoResponse::into_response((
                            StatusCode::TEMPORARY_REDIRECT,
                            [("location", to.clone())],
                        )),
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        Self { addr, received }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    async fn wait_for(&self, count: usize, within: Duration) {
        eventually(within, &format!("{count} POST(s) received"), async || {
            self.received().len() >= count
        })
        .await;
    }
}

/// The base config with client `c` (`tokens_per_day = limit`) and `[alerts]`
/// posting to `url` at `thresholds`, signed with [`SECRET`].
fn config(upstream: &str, url: &str, limit: u64, thresholds: &str) -> String {
    base_config(
        upstream,
        &format!(
            "[[clients]]\nname = \"c\"\nkey = \"{}\"\n[clients.budget]\ntokens_per_day = {limit}\n\n\
             [alerts]\nwebhook_url = \"{url}\"\nsecret = \"{SECRET}\"\nthresholds = {thresholds}\n",
            KeyHash::of(KEY_C)
        ),
    )
}

/// A chat completion as client `c`, charged 20 tokens; its status.
async fn spend_20(iris: &Iris) -> u16 {
    let mut body = chat_body("test-model");
    body["max_tokens"] = json!(10);
    let response = iris.chat(KEY_C, &body, &[("x-mock-usage", USAGE)]).await;
    let status = response.status().as_u16();
    let _ = response.bytes().await;
    status
}

/// The signature checked with the HMAC crates directly (not Iris's code).
fn assert_signed(received: &Received) {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(&received.body);
    let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(received.signature.as_deref(), Some(expected.as_str()));
}

fn today_midnight() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let midnight = jiff::Timestamp::from_second((secs - secs % 86_400) as i64).unwrap();
    midnight.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_redis_deliver_an_alert_once_signed() {
    let Some(redis) = SharedRedis::get().await else {
        return;
    };
    let upstream = MockUpstream::start().await;
    let receiver = Receiver::start(Answer::Statuses(Mutex::default())).await;
    // 25% of 200 tokens: reached by the third request of 20.
    let text = with_store(
        &config(&upstream.base_url(), &receiver.url(), 200, "[0.25]"),
        &redis.store_toml(""),
    );
    let one = Iris::start(&text).await;
    let two = Iris::start(&text).await;

    // Both instances cross it together: two requests on each at once.
    let statuses = futures_util::future::join_all([
        spend_20(&one),
        spend_20(&two),
        spend_20(&one),
        spend_20(&two),
    ])
    .await;
    assert_eq!(statuses, [200; 4]);
    // Then each settles one more request well past it, so each instance
    // raises the alert (whichever did not already): only the store's
    // claim keeps the second from being sent.
    assert_eq!(spend_20(&one).await, 200);
    assert_eq!(spend_20(&two).await, 200);

    receiver.wait_for(1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let received = receiver.received();
    assert_eq!(received.len(), 1, "delivered once: {received:?}");
    assert_signed(&received[0]);
    let alert: Value = serde_json::from_slice(&received[0].body).unwrap();
    assert_eq!(alert["type"], "budget.threshold");
    assert_eq!(alert["subject"], json!({"kind": "client", "name": "c"}));
    assert_eq!(alert["window"], "tokens_per_day");
    assert_eq!(alert["threshold"], 0.25);
    assert_eq!(alert["limit"], 200);
    let used = alert["used"].as_u64().unwrap();
    assert!((50..=120).contains(&used), "{alert}");
    assert_eq!(alert["period_start"], today_midnight());
    assert!(
        alert["at"]
            .as_str()
            .unwrap()
            .parse::<jiff::Timestamp>()
            .is_ok(),
        "{alert}"
    );
    let claim_keys = redis_keys(&redis, &format!("{}:v1:{{alert/*", redis.prefix)).await;
    assert_eq!(
        claim_keys.len(),
        1,
        "one claim, under the prefix: {claim_keys:?}"
    );
}

/// The keys matching `pattern` on the test's Redis.
async fn redis_keys(redis: &SharedRedis, pattern: &str) -> Vec<String> {
    let client = ::redis::Client::open(redis.url.as_str()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    ::redis::cmd("KEYS")
        .arg(pattern)
        .query_async(&mut connection)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_receiver_is_retried_until_it_takes_the_alert() {
    let upstream = MockUpstream::start().await;
    let receiver = Receiver::start(Answer::Statuses(Mutex::new(VecDeque::from([500])))).await;
    let iris = Iris::start(&config(&upstream.base_url(), &receiver.url(), 100, "[0.5]")).await;
    for _ in 0..3 {
        assert_eq!(spend_20(&iris).await, 200);
    }
    receiver.wait_for(2, Duration::from_secs(8)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let received = receiver.received();
    assert_eq!(received.len(), 2, "a 500, then the 200: {received:?}");
    assert_eq!(received[0].body, received[1].body, "the same alert again");
    assert_signed(&received[1]);
    let gap = received[1].at - received[0].at;
    assert!(
        gap >= Duration::from_millis(900) && gap <= Duration::from_secs(5),
        "the first retry within 5 s, after a pause: {gap:?}"
    );
    let alert: Value = serde_json::from_slice(&received[1].body).unwrap();
    assert_eq!(
        (alert["threshold"].as_f64(), alert["used"].as_u64()),
        (Some(0.5), Some(60))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_receiver_slows_no_request() {
    let upstream = MockUpstream::start().await;
    let receiver = Receiver::start(Answer::Hang).await;
    let iris = Iris::start(&config(
        &upstream.base_url(),
        &receiver.url(),
        10_000,
        "[0.001, 0.002, 0.003]",
    ))
    .await;
    // Every request from here on reaches a threshold or is past them.
    let mut slowest = Duration::ZERO;
    for i in 0..12 {
        let start = Instant::now();
        assert_eq!(spend_20(&iris).await, 200);
        slowest = slowest.max(start.elapsed());
        if i == 0 {
            // The first alert's POST is hanging from here on.
            receiver.wait_for(1, Duration::from_secs(5)).await;
        }
    }
    assert!(
        slowest < Duration::from_secs(2),
        "a request waited on the receiver: {slowest:?}"
    );
    // Each try gives up after 5 s, then is retried.
    let first = receiver.received()[0].at;
    eventually(
        Duration::from_secs(10),
        "an alert tried again",
        async || {
            receiver
                .received()
                .iter()
                .any(|r| r.at - first >= Duration::from_millis(5500))
        },
    )
    .await;
    let alerts: Vec<f64> = receiver
        .received()
        .iter()
        .map(|r| {
            serde_json::from_slice::<Value>(&r.body).unwrap()["threshold"]
                .as_f64()
                .unwrap()
        })
        .collect();
    for threshold in [0.001, 0.002, 0.003] {
        assert!(alerts.contains(&threshold), "{alerts:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_is_not_followed_but_retried() {
    let upstream = MockUpstream::start().await;
    let elsewhere = Receiver::start(Answer::Statuses(Mutex::default())).await;
    let moved = Receiver::start(Answer::Redirect(elsewhere.url())).await;
    let iris = Iris::start(&config(&upstream.base_url(), &moved.url(), 100, "[0.2]")).await;
    assert_eq!(spend_20(&iris).await, 200);
    moved.wait_for(2, Duration::from_secs(5)).await;
    assert!(
        elsewhere.received().is_empty(),
        "the redirect's target got {:?}",
        elsewhere.received()
    );
}

#[test]
fn iris_check_refuses_a_bad_webhook_url_and_thresholds() {
    let config = crate::support::write_config(&format!(
        "{}\n[alerts]\nwebhook_url = \"file:///etc/passwd\"\nthresholds = [0.9, 0.8, 0]\ncolour = 1\n",
        base_config("http://127.0.0.1:9/v1", "")
    ));
    let output = iris_command()
        .args(["check", "--config"])
        .arg(config.path())
        .output()
        .expect("run iris check");
    assert_eq!(output.status.code(), Some(1));
    let text = String::from_utf8_lossy(&output.stdout);
    for expected in [
        "alerts.webhook_url: must be an http:// or https:// URL",
        "alerts.thresholds[1]: must be above the one before it (ascending, each once)",
        "alerts.thresholds[2]: 0 is not a fraction in (0, 1] (0.8 is 80% of a window)",
        "alerts.colour: unknown key",
    ] {
        assert!(
            text.lines().any(|l| l == expected),
            "missing {expected:?} in:\n{text}"
        );
    }
    let good = crate::support::write_config(&format!(
        "{}\n[alerts]\nwebhook_url = \"http://10.0.0.7:8080/iris\"\nsecret = \"${{IRIS_TEST_ALERT_SECRET}}\"\n",
        base_config("http://127.0.0.1:9/v1", "")
    ));
    let output = iris_command()
        .args(["check", "--config"])
        .arg(good.path())
        .env("IRIS_TEST_ALERT_SECRET", "s")
        .output()
        .expect("run iris check");
    assert!(
        output.status.success(),
        "a private address is the operator's to use: {}",
        String::from_utf8_lossy(&output.stdout)
    );
}

/// The README's receiver, run as it is printed there, against Iris: it
/// accepts Iris's signed alert and refuses a forged one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_receiver_checks_the_signature() {
    use std::io::BufRead as _;

    /// The receiver's process, killed when the test ends however it ends.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = &readme[readme
        .find("## Budget alerts")
        .expect("the README's section")..];
    let code = section
        .split("```python\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a Python block in the README's section");
    let Ok(child) = std::process::Command::new("python3")
        .arg("-c")
        .arg(code)
        .env("IRIS_ALERT_SECRET", SECRET)
        .env("PORT", "0")
        .stdout(std::process::Stdio::piped())
        .spawn()
    else {
        crate::support::skip::<()>("python3 is not installed");
        return;
    };
    let mut python = Killed(child);
    let stdout = python.0.stdout.take().unwrap();
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut read = async || -> String {
        tokio::time::timeout(Duration::from_secs(10), lines.recv())
            .await
            .expect("the receiver printed in time")
            .expect("a line")
    };
    let listening = read().await;
    let port = listening.strip_prefix("listening on ").expect(&listening);
    let url = format!("http://127.0.0.1:{port}/");

    // A forged alert: refused.
    let forged = crate::support::http()
        .post(&url)
        .header("x-iris-signature", "sha256=00")
        .body(r#"{"type":"budget.threshold"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 401);

    let upstream = MockUpstream::start().await;
    let iris = Iris::start(&config(&upstream.base_url(), &url, 100, "[0.5]")).await;
    for _ in 0..3 {
        assert_eq!(spend_20(&iris).await, 200);
    }
    assert_eq!(read().await, "client c tokens_per_day 0.5 60 of 100");
    drop(python);
}

/// A team's money window: the alert names the team, in currency units, in
/// the month's period; the client, without limits of its own, raises none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_teams_cost_window_is_alerted_in_currency_units() {
    let upstream = MockUpstream::start().await;
    let receiver = Receiver::start(Answer::Statuses(Mutex::default())).await;
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"

[store]
kind = "memory"

[[upstreams]]
name = "mock"
base_url = "{upstream}"

[[models]]
name = "test-model"
upstream = "mock"
price = {{ input = 2.50, output = 10.00 }}

[[teams]]
name = "research"
[teams.budget]
cost_per_month = 0.0002

[[clients]]
name = "c"
key = "{key}"
team = "research"

[alerts]
webhook_url = "{url}"
thresholds = [0.5]
"#,
        upstream = upstream.base_url(),
        key = KeyHash::of(KEY_C),
        url = receiver.url(),
    );
    let iris = Iris::start(&text).await;
    // 10 prompt tokens at 2.50 and 10 completion tokens at 10.00 a million.
    assert_eq!(spend_20(&iris).await, 200);
    receiver.wait_for(1, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let received = receiver.received();
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(received[0].signature, None, "no secret, no signature");
    let alert: Value = serde_json::from_slice(&received[0].body).unwrap();
    assert_eq!(
        alert["subject"],
        json!({"kind": "team", "name": "research"})
    );
    assert_eq!(alert["window"], "cost_per_month");
    assert_eq!(
        (alert["used"].as_f64(), alert["limit"].as_f64()),
        (Some(0.000125), Some(0.0002))
    );
    let month = &today_midnight()[..8];
    assert_eq!(alert["period_start"], format!("{month}01T00:00:00Z"));
}
