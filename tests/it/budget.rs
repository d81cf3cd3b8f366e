//! Budgets through the real server: reservations under concurrency,
//! settlement to the upstream's usage (plain, streamed, hung up), the 429s
//! and their headers, `GET /v1/usage`, persistence across a restart.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::support::{
    App, Iris, KEY_A, KEY_B, MockUpstream, base_config, chat_body, o200k, stream_body, usage_row,
};

/// Client `b` (model `other-model`) with `budget` lines; `a` is unlimited.
async fn setup(budget: &str) -> (MockUpstream, Iris) {
    let upstream = MockUpstream::start().await;
    let iris = Iris::start(&base_config(
        &upstream.base_url(),
        &format!("[clients.budget]\n{budget}"),
    ))
    .await;
    (upstream, iris)
}

/// The concatenated `delta.content` of SSE text.
fn streamed_text(sse: &str) -> String {
    sse.lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter_map(|data| serde_json::from_str::<Value>(data).ok())
        .filter_map(|chunk| {
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
}

#[tokio::test]
async fn concurrent_requests_never_exceed_the_budget() {
    let (upstream, iris) = setup("tokens_per_day = 1000").await;
    let mut body = chat_body("other-model");
    body["max_tokens"] = json!(50);
    let reserved = o200k::SAY_HELLO + 50;
    let iris = Arc::new(iris);
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let iris = Arc::clone(&iris);
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let response = iris.chat(KEY_B, &body, &[("x-mock-delay-ms", "300")]).await;
            let status = response.status().as_u16();
            let answer: Value = response.json().await.unwrap();
            (status, answer)
        }));
    }
    let mut admitted = 0;
    let mut charged = 0;
    for task in tasks {
        let (status, answer) = task.await.unwrap();
        match status {
            200 => {
                admitted += 1;
                charged += answer["usage"]["total_tokens"].as_u64().unwrap();
            }
            429 => assert_eq!(answer["error"]["code"], "insufficient_quota"),
            other => panic!("unexpected {other}: {answer}"),
        }
    }
    assert!(admitted > 0);
    assert!(
        admitted * reserved <= 1000,
        "{admitted} requests of {reserved} reserved tokens admitted"
    );
    assert_eq!(
        upstream.received().len() as u64,
        admitted,
        "refused ones never went upstream"
    );
    iris.settled(KEY_B).await;
    assert_eq!(iris.used(KEY_B, "tokens_per_day").await, charged);
    assert!(charged <= 1000, "{charged}");
}

#[tokio::test]
async fn a_plain_answer_to_a_stream_request_settles_to_its_reported_usage() {
    let (_upstream, iris) = setup("tokens_per_day = 100000").await;
    let body = stream_body("other-model");
    let response = iris.chat(KEY_B, &body, &[("x-mock-plain", "1")]).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    let total = answer["usage"]["total_tokens"].as_u64().unwrap();
    iris.settled(KEY_B).await;
    assert_eq!(
        iris.used(KEY_B, "tokens_per_day").await,
        total,
        "read as a JSON body, not as events"
    );
}

/// A message whose content is a list of parts (not a string Iris reads)
/// still settles to the usage beside it, not to Iris's estimate.
#[tokio::test]
async fn an_answer_with_content_parts_settles_to_its_reported_usage() {
    let (_upstream, iris) = setup("tokens_per_day = 100000").await;
    let usage = r#"{"prompt_tokens": 1234, "completion_tokens": 567, "total_tokens": 1801}"#;
    let response = iris
        .chat(
            KEY_B,
            &chat_body("other-model"),
            &[("x-mock-content-parts", "1"), ("x-mock-usage", usage)],
        )
        .await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert!(
        answer["choices"][0]["message"]["content"].is_array(),
        "{answer}"
    );
    iris.settled(KEY_B).await;
    assert_eq!(iris.used(KEY_B, "tokens_per_day").await, 1801);
}

#[tokio::test]
async fn a_plain_response_settles_to_its_reported_usage() {
    let (upstream, iris) = setup("tokens_per_day = 100000").await;
    let response = iris.chat(KEY_B, &chat_body("other-model"), &[]).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    let total = answer["usage"]["total_tokens"].as_u64().unwrap();
    assert_eq!(total, upstream.last().body.len() as u64 / 4 + 7);

    let report = iris.usage(KEY_B).await;
    assert_eq!(report["object"], "usage");
    assert_eq!(report["client"], "b");
    let day = &report["windows"]["tokens_per_day"];
    assert_eq!(day["limit"], 100_000);
    assert_eq!(
        day["used"], total,
        "the 4096-token reservation was replaced"
    );
    assert_eq!(day["remaining"], 100_000 - total);
    assert!(
        day["reset_at"].as_u64().unwrap() % 86_400 == 0,
        "midnight UTC"
    );
    assert!(day["reset_in"].as_str().unwrap().ends_with('s'));
    assert_eq!(report["windows"]["max_concurrent"]["used"], 0);
    assert!(report["windows"]["max_concurrent"]["limit"].is_null());
    assert!(
        report["windows"].get("tokens_per_minute").is_none(),
        "minute windows are listed only when limited"
    );
}

#[tokio::test]
async fn streamed_usage_settles_and_its_chunk_is_hidden_unless_asked_for() {
    let (upstream, iris) = setup("tokens_per_day = 100000").await;
    let mut body = stream_body("other-model");

    let text = iris
        .chat(KEY_B, &body, &[("x-mock-chunks", "5")])
        .await
        .text()
        .await
        .unwrap();
    assert!(
        !text.contains("\"usage\":{"),
        "Iris's usage chunk is removed: {text}"
    );
    let first = upstream.last().body.len() as u64 / 4 + 5;
    assert_eq!(iris.used(KEY_B, "tokens_per_day").await, first);

    body["stream_options"] = json!({"include_usage": true});
    let text = iris
        .chat(KEY_B, &body, &[("x-mock-chunks", "2")])
        .await
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("\"usage\":{"),
        "the client asked for it: {text}"
    );
    let second = upstream.last().body.len() as u64 / 4 + 2;
    assert_eq!(iris.used(KEY_B, "tokens_per_day").await, first + second);
}

#[tokio::test]
async fn a_stream_without_usage_settles_from_the_streamed_text() {
    let (_upstream, iris) = setup("tokens_per_day = 100000").await;
    let body = stream_body("other-model");
    let text = iris
        .chat(
            KEY_B,
            &body,
            &[("x-mock-no-usage", "1"), ("x-mock-chunks", "4")],
        )
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(streamed_text(&text), "word0 word1 word2 word3 ");
    assert_eq!(
        iris.used(KEY_B, "tokens_per_day").await,
        o200k::SAY_HELLO + o200k::WORDS[4]
    );
}

#[tokio::test]
async fn a_client_hanging_up_mid_stream_pays_for_what_was_generated() {
    let (upstream, iris) = setup("tokens_per_day = 100000").await;
    let body = stream_body("other-model");
    let response = iris
        .chat(
            KEY_B,
            &body,
            &[("x-mock-chunks", "50"), ("x-mock-chunk-delay-ms", "50")],
        )
        .await;
    assert_eq!(response.status(), 200);
    assert!(
        header(&response, "x-ratelimit-remaining-tokens").is_some(),
        "rate-limit headers come with the head, before the first byte"
    );
    let mut stream = response.bytes_stream();
    let mut read = String::new();
    while !read.contains("word2") {
        let chunk = stream.next().await.unwrap().unwrap();
        read.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(stream);

    let deadline = Instant::now() + Duration::from_secs(5);
    while upstream.cancelled_streams() == 0 {
        assert!(
            Instant::now() < deadline,
            "the upstream stream was not cancelled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    iris.settled(KEY_B).await;

    // Between what the client read and the whole stream, counted as
    // OpenAI's tokenizer counts them.
    let charged = iris.used(KEY_B, "tokens_per_day").await;
    let read_words = streamed_text(&read).split_whitespace().count();
    let (prompt, seen) = (o200k::SAY_HELLO, o200k::WORDS[read_words]);
    assert!(charged >= prompt + seen, "{charged} < {prompt} + {seen}");
    assert!(
        charged < prompt + o200k::WORDS[50],
        "charged for text never generated: {charged}"
    );
}

#[tokio::test]
async fn usage_survives_a_restart_with_sqlite() {
    let upstream = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("iris.db");
    let config = base_config(
        &upstream.base_url(),
        "[clients.budget]\ntokens_per_day = 100000",
    )
    .replace(
        "kind = \"memory\"",
        &format!("kind = \"sqlite\"\npath = \"{}\"", db.display()),
    );

    let iris = Iris::start(&config).await;
    let answer: Value = iris
        .chat(KEY_B, &chat_body("other-model"), &[])
        .await
        .json()
        .await
        .unwrap();
    let spent = answer["usage"]["total_tokens"].as_u64().unwrap();
    assert_eq!(iris.used(KEY_B, "tokens_per_day").await, spent);
    iris.stop().await.unwrap();

    let iris = Iris::start(&config).await;
    assert_eq!(iris.used(KEY_B, "tokens_per_day").await, spent);
    assert_eq!(iris.used(KEY_B, "tokens_per_month").await, spent);
    assert_eq!(iris.used(KEY_A, "tokens_per_day").await, 0);

    // `iris usage` reads the same file, even while the server runs.
    assert_eq!(
        usage_row(&config, "b", "tokens_per_day")[..5],
        [
            "b",
            "tokens_per_day",
            "100000",
            &spent.to_string(),
            &(100_000 - spent).to_string()
        ]
    );
    iris.stop().await.unwrap();
}

#[tokio::test]
async fn one_clients_spending_leaves_another_untouched() {
    let (_upstream, iris) = setup("tokens_per_day = 200").await;
    let mut body = chat_body("other-model");
    body["max_tokens"] = json!(100);
    let mut refused = None;
    for _ in 0..10 {
        let response = iris.chat(KEY_B, &body, &[]).await;
        if response.status() == 429 {
            refused = Some(response);
            break;
        }
    }
    assert!(refused.is_some(), "b's budget ran out");
    let b_used = iris.used(KEY_B, "tokens_per_day").await;

    let response = iris.chat(KEY_A, &body, &[]).await;
    assert_eq!(response.status(), 200, "a has its own budget");
    let answer: Value = response.json().await.unwrap();
    assert_eq!(
        iris.used(KEY_A, "tokens_per_day").await,
        answer["usage"]["total_tokens"].as_u64().unwrap()
    );
    assert_eq!(iris.used(KEY_B, "tokens_per_day").await, b_used);
}

#[tokio::test]
async fn max_concurrent_refuses_while_requests_are_in_flight() {
    let (_upstream, iris) = setup("max_concurrent = 2").await;
    let iris = Arc::new(iris);
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let iris = Arc::clone(&iris);
            tokio::spawn(async move {
                iris.chat(
                    KEY_B,
                    &chat_body("other-model"),
                    &[("x-mock-delay-ms", "700")],
                )
                .await
                .status()
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    while iris.used(KEY_B, "max_concurrent").await < 2 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let response = iris.chat(KEY_B, &chat_body("other-model"), &[]).await;
    assert_eq!(response.status(), 429);
    assert_eq!(header(&response, "retry-after").as_deref(), Some("1"));
    assert_eq!(header(&response, "x-should-retry"), None);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "rate_limit_exceeded");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_concurrent")
    );

    for task in slow {
        assert_eq!(task.await.unwrap(), 200);
    }
    iris.settled(KEY_B).await;
    let response = iris.chat(KEY_B, &chat_body("other-model"), &[]).await;
    assert_eq!(response.status(), 200, "slots are freed when requests end");
}

#[tokio::test]
async fn requests_per_minute_is_enforced_with_retry_after() {
    let (upstream, iris) = setup("requests_per_minute = 3").await;
    for remaining in ["2", "1", "0"] {
        let response = iris.chat(KEY_B, &chat_body("other-model"), &[]).await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            header(&response, "x-ratelimit-limit-requests").as_deref(),
            Some("3")
        );
        assert_eq!(
            header(&response, "x-ratelimit-remaining-requests").as_deref(),
            Some(remaining)
        );
        assert!(
            header(&response, "x-ratelimit-limit-tokens").is_none(),
            "no token limit"
        );
    }
    let response = iris.chat(KEY_B, &chat_body("other-model"), &[]).await;
    assert_eq!(response.status(), 429);
    let retry_ms: u64 = header(&response, "retry-after-ms")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (19_000..=20_000).contains(&retry_ms),
        "one request drains in 20 s: {retry_ms}"
    );
    assert_eq!(header(&response, "retry-after").as_deref(), Some("20"));
    assert_eq!(
        header(&response, "x-ratelimit-remaining-requests").as_deref(),
        Some("0")
    );
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "rate_limit_exceeded");
    assert_eq!(error["error"]["type"], "requests");
    assert_eq!(upstream.received().len(), 3);
}

#[tokio::test]
async fn rate_limit_headers_on_success_and_on_each_kind_of_429() {
    let (upstream, iris) =
        setup("tokens_per_minute = 100000\ntokens_per_day = 5000\nrequests_per_minute = 100").await;
    let mut body = chat_body("other-model");
    body["max_tokens"] = json!(1000);
    let reserved = o200k::SAY_HELLO + 1000;

    let response = iris.chat(KEY_B, &body, &[]).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        header(&response, "x-ratelimit-limit-tokens").as_deref(),
        Some("5000")
    );
    assert_eq!(
        header(&response, "x-ratelimit-remaining-tokens"),
        Some((5000 - reserved).to_string()),
        "as of the reservation"
    );
    let reset = header(&response, "x-ratelimit-reset-tokens").unwrap();
    assert!(
        reset.contains('h') || reset.contains('m'),
        "until midnight: {reset}"
    );
    assert_eq!(
        header(&response, "x-ratelimit-limit-requests").as_deref(),
        Some("100")
    );
    assert_eq!(
        header(&response, "x-ratelimit-remaining-requests").as_deref(),
        Some("99")
    );
    assert_eq!(
        header(&response, "x-ratelimit-reset-requests").as_deref(),
        Some("600ms")
    );
    let answer: Value = response.json().await.unwrap();
    let spent = answer["usage"]["total_tokens"].as_u64().unwrap();

    // Spend the day down: the request is refused with the reset time, and
    // SDKs are told not to retry.
    body["max_tokens"] = json!(5000 - spent - o200k::SAY_HELLO + 1);
    let response = iris.chat(KEY_B, &body, &[]).await;
    assert_eq!(response.status(), 429);
    assert_eq!(
        header(&response, "x-should-retry").as_deref(),
        Some("false")
    );
    let retry: u64 = header(&response, "retry-after").unwrap().parse().unwrap();
    assert!(retry > 0 && retry <= 86_400, "{retry}");
    assert_eq!(
        header(&response, "x-ratelimit-remaining-tokens"),
        Some((5000 - spent).to_string())
    );
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "insufficient_quota");
    assert_eq!(error["error"]["type"], "insufficient_quota");

    // Larger than the whole day: refused outright, no Retry-After.
    body["max_tokens"] = json!(6000);
    let response = iris.chat(KEY_B, &body, &[]).await;
    assert_eq!(response.status(), 429);
    assert_eq!(
        header(&response, "x-should-retry").as_deref(),
        Some("false")
    );
    assert_eq!(header(&response, "retry-after"), None);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "insufficient_quota");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tokens_per_day")
    );
    assert_eq!(
        upstream.received().len(),
        1,
        "refusals never reach the upstream"
    );
}

#[tokio::test]
async fn upstream_errors_and_failures_return_the_reservation() {
    let (_upstream, iris) = setup("tokens_per_day = 100000").await;
    let response = iris
        .chat(
            KEY_B,
            &chat_body("other-model"),
            &[("x-mock-status", "500")],
        )
        .await;
    assert_eq!(response.status(), 500, "passed through");
    assert!(header(&response, "x-ratelimit-limit-tokens").is_some());
    let _ = response.text().await;
    iris.settled(KEY_B).await;
    assert_eq!(iris.used(KEY_B, "tokens_per_day").await, 0);

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}/v1", closed.local_addr().unwrap());
    drop(closed);
    let iris = Iris::start(&base_config(
        &dead,
        "[clients.budget]\ntokens_per_day = 100000",
    ))
    .await;
    let response = iris.chat(KEY_B, &chat_body("other-model"), &[]).await;
    assert_eq!(response.status(), 502);
    assert_eq!(iris.used(KEY_B, "tokens_per_day").await, 0);
    assert_eq!(iris.used(KEY_B, "max_concurrent").await, 0);
}

#[tokio::test]
async fn usage_is_counted_in_metrics_and_requires_a_key() {
    let upstream = MockUpstream::start().await;
    let app = App::start(&base_config(
        &upstream.base_url(),
        "[clients.budget]\ntokens_per_day = 10",
    ))
    .await;
    let chat = async |key| {
        app.post_json("/v1/chat/completions", Some(key), &chat_body("other-model"))
            .await
            .status
    };
    assert_eq!(chat(KEY_A).await, 200);
    assert_eq!(chat(KEY_B).await, 429);

    let metrics = app.get("/metrics", None).await.text();
    let has = |needle: &[&str]| {
        metrics
            .lines()
            .any(|line| needle.iter().all(|part| line.contains(part)))
    };
    assert!(
        has(&[
            "iris_tokens_total{",
            "client=\"a\"",
            "model=\"other-model\"",
            "kind=\"prompt\""
        ]),
        "{metrics}"
    );
    assert!(
        has(&["iris_tokens_total{", "client=\"a\"", "kind=\"completion\""]),
        "{metrics}"
    );
    assert!(
        has(&[
            "iris_budget_rejections_total{",
            "client=\"b\"",
            "reason=\"tokens_per_day\""
        ]),
        "{metrics}"
    );

    assert_eq!(app.get("/v1/usage", None).await.status, 401);
}

#[tokio::test]
async fn readiness_and_requests_follow_the_store() {
    use iris::budget::store::{Parties, Reserved, Store, StoreError, StoreFuture};
    use iris::budget::window::{Charge, Clock, Hold, Snapshot};
    use iris::budget::{Account, Limits, OnUnavailable};

    struct Down;
    fn down<T>() -> StoreFuture<T> {
        Box::pin(async { Err(StoreError("connection refused".into())) })
    }
    impl Store for Down {
        fn reserve(&self, _: &Parties, _: Charge, _: u64) -> StoreFuture<Reserved> {
            down()
        }
        fn settle(&self, _: &Parties, _: Hold, _: Charge, _: u64) -> StoreFuture<()> {
            down()
        }
        fn snapshot(&self, _: &Account, _: &Limits, _: u64) -> StoreFuture<Snapshot> {
            down()
        }
        fn health(&self) -> StoreFuture<()> {
            down()
        }
        fn flush(&self) -> StoreFuture<()> {
            down()
        }
    }

    let upstream = MockUpstream::start().await;
    let config = base_config(&upstream.base_url(), "");
    let mut state = crate::support::state(&config).await;
    state.gateway.budgets =
        iris::budget::Budgets::new(Arc::new(Down), Clock::system(), OnUnavailable::Reject);
    let app = App::with_state(state);
    assert_eq!(app.get("/readyz", None).await.status, 503);

    let response = app
        .post_json(
            "/v1/chat/completions",
            Some(KEY_A),
            &chat_body("test-model"),
        )
        .await;
    assert_eq!(response.status, 503);
    assert!(
        upstream.received().is_empty(),
        "nothing is sent without accounting"
    );

    let app = App::start(&config).await;
    assert_eq!(app.get("/readyz", None).await.status, 200);
}
