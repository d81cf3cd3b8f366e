//! The gateway core through the real server: forwarding, streaming, auth,
//! errors, the rest of the HTTP surface, shutdown.

use std::time::{Duration, Instant};

use crate::support::{Iris, KEY_A, KEY_B, MockUpstream, base_config, chat_body, http};
use futures_util::StreamExt;
use serde_json::{Value, json};

async fn setup() -> (MockUpstream, Iris) {
    let upstream = MockUpstream::start().await;
    let iris = Iris::start(&base_config(&upstream.base_url(), "")).await;
    (upstream, iris)
}

async fn error_of(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    assert_eq!(
        response.headers().get("content-type").map(|v| v.as_bytes()),
        Some(&b"application/json"[..]),
        "errors are JSON"
    );
    let body: Value = response.json().await.expect("error body is JSON");
    (status, body["error"].clone())
}

#[tokio::test]
async fn forwards_with_upstream_credentials_and_renamed_model() {
    let (upstream, iris) = setup().await;
    let body = json!({
        "model": "test-model",
        "messages": [{"role": "user", "content": "Say hello"}],
        "temperature": 0.2,
        "some_future_field": {"nested": [1, 2, 3]},
    });
    let response = http()
        .post(iris.url("/v1/chat/completions"))
        .bearer_auth(KEY_A)
        .header("x-request-id", "client-chosen-id")
        .header("x-custom-header", "kept")
        .json(&body)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "client-chosen-id");
    let answer: Value = response.json().await.expect("json");
    assert_eq!(
        answer["model"], "upstream-model",
        "the upstream's model name reaches the client as sent"
    );
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "Hello from the mock upstream."
    );

    let seen = upstream.last();
    assert_eq!(seen.headers["authorization"], "Bearer upstream-secret-key");
    assert_eq!(seen.headers["x-custom-header"], "kept");
    assert_eq!(seen.headers["x-request-id"], "client-chosen-id");
    let mut expected = body.clone();
    expected["model"] = json!("upstream-model");
    assert_eq!(
        seen.json(),
        expected,
        "every other field passes through unchanged"
    );
}

#[tokio::test]
async fn unchanged_requests_are_forwarded_byte_for_byte() {
    let (upstream, iris) = setup().await;
    let raw = "{\"model\":\"other-model\",  \"messages\":[{\"role\":\"user\",\"content\":\"caf\\u00e9\"}],\"n\":1}";
    let response = http()
        .post(iris.url("/v1/chat/completions"))
        .bearer_auth(KEY_A)
        .body(raw)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    assert_eq!(upstream.last().body, raw.as_bytes());
}

#[tokio::test]
async fn every_response_gets_a_request_id() {
    let (_upstream, iris) = setup().await;
    let a = http()
        .get(iris.url("/healthz"))
        .send()
        .await
        .expect("request");
    let b = http().get(iris.url("/nope")).send().await.expect("request");
    let (a, b) = (&a.headers()["x-request-id"], &b.headers()["x-request-id"]);
    assert!(!a.is_empty() && a != b);
}

#[tokio::test]
async fn streams_are_relayed_and_the_added_usage_chunk_is_removed() {
    let (upstream, iris) = setup().await;
    let mut body = chat_body("test-model");
    body["stream"] = json!(true);
    let response = http()
        .post(iris.url("/v1/chat/completions"))
        .bearer_auth(KEY_A)
        .json(&body)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert!(
        response
            .headers()
            .get("x-ratelimit-remaining-tokens")
            .is_none_or(|v| v != "999"),
        "the upstream's own rate-limit headers are not passed back"
    );
    let text = response.text().await.expect("body");
    assert!(text.contains("word0") && text.contains("word2"), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(!text.contains("\"usage\":{"), "usage chunk removed: {text}");
    assert_eq!(
        upstream.last().json()["stream_options"]["include_usage"],
        true
    );
}

#[tokio::test]
async fn the_usage_chunk_stays_when_the_client_asks_for_it() {
    let (_upstream, iris) = setup().await;
    let mut body = chat_body("test-model");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let text = http()
        .post(iris.url("/v1/chat/completions"))
        .bearer_auth(KEY_A)
        .json(&body)
        .send()
        .await
        .expect("request")
        .text()
        .await
        .expect("body");
    assert!(text.contains("\"usage\":{"), "{text}");
}

#[tokio::test]
async fn a_plain_answer_to_a_stream_request_is_relayed_whole() {
    let (_upstream, iris) = setup().await;
    let mut body = chat_body("test-model");
    body["stream"] = json!(true);
    let response = http()
        .post(iris.url("/v1/chat/completions"))
        .bearer_auth(KEY_A)
        .header("x-mock-plain", "1")
        .json(&body)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.expect("the whole JSON body");
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "Hello from the mock upstream."
    );
}

#[tokio::test]
async fn stream_chunks_are_flushed_as_they_arrive() {
    let (_upstream, iris) = setup().await;
    let mut body = chat_body("test-model");
    body["stream"] = json!(true);
    let started = Instant::now();
    let response = http()
        .post(iris.url("/v1/chat/completions"))
        .bearer_auth(KEY_A)
        .header("x-mock-chunk-delay-ms", "300")
        .header("x-mock-chunks", "3")
        .json(&body)
        .send()
        .await
        .expect("request");
    let mut stream = response.bytes_stream();
    let first = stream.next().await.expect("a chunk").expect("ok");
    let first_at = started.elapsed();
    assert!(String::from_utf8_lossy(&first).contains("assistant"));
    while stream.next().await.is_some() {}
    let total = started.elapsed();
    // Six 300 ms gaps follow the first event: if Iris buffered, the first
    // chunk would arrive with the rest.
    assert!(total >= Duration::from_millis(1500), "{total:?}");
    assert!(
        first_at < total - Duration::from_millis(1000),
        "first {first_at:?}, total {total:?}"
    );
}

#[tokio::test]
async fn a_client_hanging_up_cancels_the_upstream_stream() {
    let (upstream, iris) = setup().await;
    let mut body = chat_body("test-model");
    body["stream"] = json!(true);
    let response = http()
        .post(iris.url("/v1/chat/completions"))
        .bearer_auth(KEY_A)
        .header("x-mock-chunk-delay-ms", "100")
        .header("x-mock-chunks", "50")
        .json(&body)
        .send()
        .await
        .expect("request");
    let mut stream = response.bytes_stream();
    stream.next().await.expect("a chunk").expect("ok");
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(5);
    while upstream.cancelled_streams() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        upstream.cancelled_streams(),
        1,
        "the upstream saw the hang-up"
    );
}

#[tokio::test]
async fn authentication_and_model_access() {
    let (upstream, iris) = setup().await;
    let post = |key: Option<&str>, model: &str| {
        let mut request = http()
            .post(iris.url("/v1/chat/completions"))
            .json(&chat_body(model));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send()
    };
    let (status, error) = error_of(post(None, "test-model").await.expect("request")).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (401, Some("invalid_api_key"))
    );
    let (status, error) = error_of(post(Some("wrong"), "test-model").await.expect("request")).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (401, Some("invalid_api_key"))
    );
    let (status, error) =
        error_of(post(Some(KEY_A), "no-such-model").await.expect("request")).await;
    assert_eq!(
        (status, error["code"].as_str(), error["param"].as_str()),
        (404, Some("model_not_found"), Some("model"))
    );
    let (status, error) = error_of(post(Some(KEY_B), "test-model").await.expect("request")).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (403, Some("model_not_allowed"))
    );
    assert_eq!(
        post(Some(KEY_B), "other-model")
            .await
            .expect("request")
            .status(),
        200
    );
    assert_eq!(
        upstream.received().len(),
        1,
        "only the allowed request went upstream"
    );
}

#[tokio::test]
async fn the_responses_api_is_refused_on_every_method_and_path() {
    let (upstream, iris) = setup().await;
    for (method, path) in [
        (reqwest::Method::POST, "/v1/responses"),
        (reqwest::Method::GET, "/v1/responses/resp_123"),
        (reqwest::Method::DELETE, "/v1/responses/resp_123"),
        (reqwest::Method::GET, "/v1/responses/resp_123/input_items"),
    ] {
        let response = http()
            .request(method, iris.url(path))
            .bearer_auth(KEY_A)
            .json(&json!({"model": "test-model", "input": "hi"}))
            .send()
            .await
            .expect("request");
        let (status, error) = error_of(response).await;
        assert_eq!(status, 400, "{path}");
        assert_eq!(error["code"], "unsupported_api");
        assert!(
            error["message"]
                .as_str()
                .unwrap_or("")
                .contains("POST /v1/chat/completions")
        );
    }
    assert!(upstream.received().is_empty(), "nothing sent upstream");
}

#[tokio::test]
async fn unknown_paths_and_methods_answer_in_openai_shape() {
    let (_upstream, iris) = setup().await;
    let (status, error) = error_of(
        http()
            .get(iris.url("/v1/embeddings"))
            .send()
            .await
            .expect("request"),
    )
    .await;
    assert_eq!((status, error["code"].as_str()), (404, Some("not_found")));
    let (status, _) = error_of(
        http()
            .get(iris.url("/v1/chat/completions"))
            .send()
            .await
            .expect("request"),
    )
    .await;
    assert_eq!(status, 405);
}

#[tokio::test]
async fn models_are_listed_per_client() {
    let (_upstream, iris) = setup().await;
    let get = |path: &str, key: Option<&str>| {
        let request = http().get(iris.url(path));
        match key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
        .send()
    };
    let json =
        |response: reqwest::Response| async move { response.json::<Value>().await.expect("json") };

    let a = json(get("/v1/models", Some(KEY_A)).await.expect("request")).await;
    assert_eq!(a["object"], "list");
    let ids: Vec<&str> = a["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, ["test-model", "other-model"]);
    assert_eq!(a["data"][0]["object"], "model");
    let b = json(get("/v1/models", Some(KEY_B)).await.expect("request")).await;
    assert_eq!(b["data"].as_array().map(Vec::len), Some(1));

    let one = json(
        get("/v1/models/test-model", Some(KEY_A))
            .await
            .expect("request"),
    )
    .await;
    assert_eq!(one["id"], "test-model");
    for (path, key, status, code) in [
        (
            "/v1/models/test-model",
            Some(KEY_B),
            403,
            "model_not_allowed",
        ),
        ("/v1/models/nope", Some(KEY_A), 404, "model_not_found"),
        ("/v1/models/%FF", Some(KEY_A), 400, "invalid_request"),
        ("/v1/models", None, 401, "invalid_api_key"),
    ] {
        let (got, error) = error_of(get(path, key).await.expect("request")).await;
        assert_eq!(
            (got, error["code"].as_str()),
            (status, Some(code)),
            "{path}"
        );
    }
}

#[tokio::test]
async fn bad_bodies_are_refused_with_their_param() {
    let (upstream, iris) = setup().await;
    let send = |body: &'static str| {
        http()
            .post(iris.url("/v1/chat/completions"))
            .bearer_auth(KEY_A)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    for (body, param) in [
        ("{not json", None),
        ("[]", None),
        (
            r#"{"messages":[{"role":"user","content":"x"}]}"#,
            Some("model"),
        ),
        (
            r#"{"model":7,"messages":[{"role":"user","content":"x"}]}"#,
            Some("model"),
        ),
        (
            r#"{"model":"test-model","messages":"hi"}"#,
            Some("messages"),
        ),
    ] {
        let (status, error) = error_of(send(body).await.expect("request")).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(error["code"], "invalid_request", "{body}");
        assert_eq!(error["param"].as_str(), param, "{body}");
    }
    let deep = format!(
        r#"{{"model":"test-model","messages":[{{"role":"user","content":"x"}}],"x":{}}}"#,
        "[".repeat(100_000)
    );
    let response = http()
        .post(iris.url("/v1/chat/completions"))
        .bearer_auth(KEY_A)
        .body(deep)
        .send()
        .await
        .expect("request");
    assert_eq!(error_of(response).await.0, 400);
    assert!(upstream.received().is_empty());
    // The server is still fine.
    assert_eq!(
        http()
            .get(iris.url("/healthz"))
            .send()
            .await
            .expect("request")
            .status(),
        200
    );
}

#[tokio::test]
async fn oversized_bodies_are_refused_with_or_without_a_length() {
    let upstream = MockUpstream::start().await;
    let config = base_config(&upstream.base_url(), "").replace(
        "shutdown_grace_ms = 2000",
        "shutdown_grace_ms = 2000\nmax_body_bytes = 1024",
    );
    let iris = Iris::start(&config).await;
    let big = format!(
        r#"{{"model":"test-model","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(4096)
    );

    let (status, error) = error_of(
        http()
            .post(iris.url("/v1/chat/completions"))
            .bearer_auth(KEY_A)
            .body(big.clone())
            .send()
            .await
            .expect("request"),
    )
    .await;
    assert_eq!(
        (status, error["code"].as_str()),
        (413, Some("request_too_large"))
    );

    let chunks: Vec<Result<String, std::io::Error>> = big
        .as_bytes()
        .chunks(100)
        .map(|c| Ok(String::from_utf8_lossy(c).into_owned()))
        .collect();
    let streamed = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let response = http()
        .post(iris.url("/v1/chat/completions"))
        .bearer_auth(KEY_A)
        .body(streamed)
        .send()
        .await
        .expect("request");
    assert!(
        response
            .headers()
            .get("content-length")
            .is_none_or(|_| true)
    );
    let (status, error) = error_of(response).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (413, Some("request_too_large"))
    );
    assert!(upstream.received().is_empty());
}

#[tokio::test]
async fn upstream_errors_pass_through_with_status_and_body() {
    let (_upstream, iris) = setup().await;
    let response = http()
        .post(iris.url("/v1/chat/completions"))
        .bearer_auth(KEY_A)
        .header("x-mock-status", "422")
        .json(&chat_body("test-model"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["code"], "mock_error");
}

#[tokio::test]
async fn unreachable_upstream_is_502_and_slow_upstream_is_504() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_port = closed.local_addr().expect("addr").port();
    drop(closed);
    let iris = Iris::start(&base_config(
        &format!("http://127.0.0.1:{dead_port}/v1"),
        "",
    ))
    .await;
    let (status, error) = error_of(
        http()
            .post(iris.url("/v1/chat/completions"))
            .bearer_auth(KEY_A)
            .json(&chat_body("test-model"))
            .send()
            .await
            .expect("request"),
    )
    .await;
    assert_eq!(
        (status, error["code"].as_str()),
        (502, Some("upstream_unavailable"))
    );
    assert!(!error.to_string().contains("upstream-secret-key"));

    let upstream = MockUpstream::start().await;
    let config =
        base_config(&upstream.base_url(), "").replace("timeout_ms = 2000", "timeout_ms = 200");
    let iris = Iris::start(&config).await;
    let (status, error) = error_of(
        http()
            .post(iris.url("/v1/chat/completions"))
            .bearer_auth(KEY_A)
            .header("x-mock-delay-ms", "2000")
            .json(&chat_body("test-model"))
            .send()
            .await
            .expect("request"),
    )
    .await;
    assert_eq!(
        (status, error["code"].as_str()),
        (504, Some("upstream_timeout"))
    );
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let (_upstream, iris) = setup().await;
    assert_eq!(
        http()
            .get(iris.url("/healthz"))
            .send()
            .await
            .expect("request")
            .status(),
        200
    );
    assert_eq!(
        http()
            .get(iris.url("/readyz"))
            .send()
            .await
            .expect("request")
            .status(),
        200
    );
    http()
        .post(iris.url("/v1/chat/completions"))
        .bearer_auth(KEY_B)
        .json(&chat_body("other-model"))
        .send()
        .await
        .expect("request");
    let metrics = http()
        .get(iris.url("/metrics"))
        .send()
        .await
        .expect("request")
        .text()
        .await
        .expect("text");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("iris_requests_total{")
                && l.contains("client=\"b\"")
                && l.contains("model=\"other-model\"")
                && l.contains("status=\"200\"")),
        "{metrics}"
    );
    assert!(
        metrics.contains("iris_request_duration_seconds_bucket"),
        "{metrics}"
    );
    assert!(
        metrics.contains("iris_upstream_duration_seconds_bucket"),
        "{metrics}"
    );
    assert!(!metrics.contains("upstream-secret-key") && !metrics.contains(KEY_B));
}

#[tokio::test]
async fn shutdown_lets_an_in_flight_stream_finish() {
    let upstream = MockUpstream::start().await;
    let mut iris = Iris::start(&base_config(&upstream.base_url(), "")).await;
    let mut body = chat_body("test-model");
    body["stream"] = json!(true);
    let response = http()
        .post(iris.url("/v1/chat/completions"))
        .bearer_auth(KEY_A)
        .header("x-mock-chunk-delay-ms", "100")
        .header("x-mock-chunks", "5")
        .json(&body)
        .send()
        .await
        .expect("request");
    let url = iris.url("/healthz");
    iris.begin_shutdown();
    let text = response.text().await.expect("the stream completes");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    iris.join().await.expect("clean stop");
    assert!(http().get(url).send().await.is_err(), "no longer accepting");
}
