//! The farm itself: each scripted fault does what the routing tests rely on,
//! seen by a plain HTTP client with no Iris in between.

use std::error::Error as _;
use std::time::Duration;

use futures_util::StreamExt as _;
use serde_json::Value;

use crate::support::mock_upstream::{Fault, refused_base_url};
use crate::support::{MockUpstream, chat_body, http, stream_body};

/// `POST {base}/chat/completions` with `body` and `headers`.
async fn post(
    client: &reqwest::Client,
    base: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> reqwest::Result<reqwest::Response> {
    let mut request = client
        .post(format!("{base}/chat/completions"))
        .timeout(Duration::from_secs(10))
        .json(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await
}

/// Reads a body to its end: what came, and whether it ended in an error.
async fn read(response: reqwest::Response) -> (String, bool) {
    let mut text = Vec::new();
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(chunk) => text.extend_from_slice(&chunk),
            Err(_) => return (String::from_utf8_lossy(&text).into_owned(), true),
        }
    }
    (String::from_utf8_lossy(&text).into_owned(), false)
}

/// Whether an `io::ErrorKind` of `kind` is somewhere in `error`'s sources.
fn caused_by(error: &reqwest::Error, kind: std::io::ErrorKind) -> bool {
    let mut source = error.source();
    while let Some(cause) = source {
        if cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == kind)
        {
            return true;
        }
        source = cause.source();
    }
    false
}

#[tokio::test]
async fn scripted_statuses_come_in_order_then_the_standing_fault_until_healed() {
    let mock = MockUpstream::start().await;
    let client = http();
    let base = mock.base_url();
    mock.fail_next(2, Fault::status(503));
    mock.fail_next(1, Fault::retry_after_s(7));
    mock.fail_next(1, Fault::retry_after_ms(250));
    mock.fail_always(Fault::status(500));
    let mut seen = Vec::new();
    for _ in 0..6 {
        let response = post(&client, &base, &chat_body("m"), &[]).await.unwrap();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_owned())
        };
        seen.push((
            response.status().as_u16(),
            header("retry-after"),
            header("retry-after-ms"),
        ));
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "mock_error");
    }
    let s = |v: &str| Some(v.to_owned());
    assert_eq!(
        seen,
        [
            (503, None, None),
            (503, None, None),
            (429, s("7"), None),
            (429, None, s("250")),
            (500, None, None),
            (500, None, None),
        ]
    );
    mock.heal();
    let response = post(&client, &base, &chat_body("m"), &[]).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(mock.requests(), 7, "every request counted, faults included");
    assert_eq!(mock.received().len(), 7);
}

#[tokio::test]
async fn a_reset_is_a_connection_reset_before_any_answer() {
    let mock = MockUpstream::start().await;
    mock.fail_next(1, Fault::Reset);
    let error = post(&http(), &mock.base_url(), &chat_body("m"), &[])
        .await
        .expect_err("no answer");
    assert!(
        caused_by(&error, std::io::ErrorKind::ConnectionReset),
        "{error:?}"
    );
    assert_eq!(mock.requests(), 1);
    // The next request, on a new connection, is answered.
    let response = post(&http(), &mock.base_url(), &chat_body("m"), &[])
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn a_hang_never_answers_the_head() {
    let mock = MockUpstream::start().await;
    mock.fail_next(1, Fault::Hang);
    let error = http()
        .post(format!("{}/chat/completions", mock.base_url()))
        .timeout(Duration::from_millis(500))
        .json(&chat_body("m"))
        .send()
        .await
        .expect_err("no head");
    assert!(error.is_timeout(), "{error:?}");
    assert_eq!(mock.requests(), 1);
}

#[tokio::test]
async fn streams_die_stall_or_end_without_done_after_k_chunks() {
    let mock = MockUpstream::start().await;
    let client = http();
    let base = mock.base_url();

    mock.fail_next(1, Fault::DieAfter(2));
    let response = post(&client, &base, &stream_body("m"), &[]).await.unwrap();
    assert_eq!(response.status(), 200);
    let (text, broken) = read(response).await;
    assert!(broken, "the connection died: {text}");
    assert!(text.contains("word1") && !text.contains("word2"), "{text}");
    assert!(!text.contains("[DONE]") && !text.contains("finish_reason\":\"stop"));

    // The same through the header, for the SDK suites.
    let response = post(
        &client,
        &base,
        &stream_body("m"),
        &[("x-mock-die-after", "1")],
    )
    .await
    .unwrap();
    let (text, broken) = read(response).await;
    assert!(
        broken && text.contains("word0") && !text.contains("word1"),
        "{text}"
    );

    mock.fail_next(1, Fault::EndWithoutDone(2));
    let response = post(&client, &base, &stream_body("m"), &[]).await.unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let (text, broken) = read(response).await;
    assert!(!broken, "a clean end of the body: {text}");
    assert!(text.contains("word1") && !text.contains("word2"), "{text}");
    assert!(
        !text.contains("[DONE]") && !text.contains("\"stop\""),
        "{text}"
    );

    mock.fail_next(1, Fault::StallAfter(2));
    let response = post(&client, &base, &stream_body("m"), &[]).await.unwrap();
    let mut body = response.bytes_stream();
    let mut text = String::new();
    while !text.contains("word1") {
        let chunk = body.next().await.expect("more").expect("a chunk");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let silence = tokio::time::timeout(Duration::from_millis(500), body.next()).await;
    assert!(silence.is_err(), "nothing after the stall: {silence:?}");
    drop(body);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while mock.cancelled_streams() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the stall never saw the reader go"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // And a healthy stream still ends with [DONE].
    let response = post(&client, &base, &stream_body("m"), &[]).await.unwrap();
    let (text, broken) = read(response).await;
    assert!(!broken && text.ends_with("data: [DONE]\n\n"), "{text}");
}

#[tokio::test]
async fn garbage_answers_are_200s_that_are_not_chat_completions() {
    let mock = MockUpstream::start().await;
    let client = http();
    mock.fail_next(1, Fault::GarbageJson);
    mock.fail_next(1, Fault::GarbageSse);
    for content_type in ["application/json", "text/event-stream"] {
        let response = post(&client, &mock.base_url(), &stream_body("m"), &[])
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], content_type);
        let text = response.text().await.unwrap();
        assert!(serde_json::from_str::<Value>(&text).is_err(), "{text}");
        assert!(!text.starts_with("data:"), "{text}");
    }
}

#[tokio::test]
async fn a_stopped_upstream_refuses_even_pooled_connections_until_restarted() {
    let mock = MockUpstream::start().await;
    let client = http();
    let base = mock.base_url();
    assert_eq!(
        post(&client, &base, &chat_body("m"), &[])
            .await
            .unwrap()
            .status(),
        200
    );
    mock.stop().await;
    let error = post(&client, &base, &chat_body("m"), &[])
        .await
        .expect_err("refused");
    assert!(error.is_connect(), "{error:?}");
    mock.restart().await;
    assert_eq!(
        post(&client, &base, &chat_body("m"), &[])
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(mock.requests(), 2);

    let error = post(&client, &refused_base_url(), &chat_body("m"), &[])
        .await
        .expect_err("refused");
    assert!(error.is_connect(), "{error:?}");
}

#[tokio::test]
async fn stopping_drops_requests_in_flight() {
    let mock = MockUpstream::start().await;
    mock.fail_next(1, Fault::Hang);
    let base = mock.base_url();
    let pending = tokio::spawn(async move { post(&http(), &base, &chat_body("m"), &[]).await });
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while mock.requests() == 0 {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    mock.stop().await;
    let outcome = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .expect("the hung request ends when the upstream stops")
        .unwrap();
    assert!(outcome.is_err(), "{outcome:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peak_of_requests_in_flight_is_counted() {
    let mock = MockUpstream::start().await;
    let client = http();
    let base = mock.base_url();
    let body = chat_body("m");
    let slow = [("x-mock-delay-ms", "500")];
    let asks = (0..3).map(|_| post(&client, &base, &body, &slow));
    for response in futures_util::future::join_all(asks).await {
        assert_eq!(response.unwrap().status(), 200);
    }
    assert_eq!(mock.peak_in_flight(), 3);
}
