//! The gateway core through the real server: forwarding, streaming, auth,
//! errors, the rest of the HTTP surface, shutdown.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Method;
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::support::app::to;
use crate::support::{
    App, Iris, KEY_A, KEY_B, MockUpstream, base_config, chat_body, http, stream_body,
};

async fn setup() -> (MockUpstream, Iris) {
    let upstream = MockUpstream::start().await;
    let iris = Iris::start(&base_config(&upstream.base_url(), "")).await;
    (upstream, iris)
}

/// Iris in-process, without a socket of its own, against the mock upstream.
async fn in_process() -> (MockUpstream, App) {
    let upstream = MockUpstream::start().await;
    let app = App::start(&base_config(&upstream.base_url(), "")).await;
    (upstream, app)
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
    let response = iris
        .chat(
            KEY_A,
            &body,
            &[
                ("x-request-id", "client-chosen-id"),
                ("x-custom-header", "kept"),
            ],
        )
        .await;
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
    let (_upstream, app) = in_process().await;
    let a = app.get("/healthz", None).await;
    let b = app.get("/nope", None).await;
    let (a, b) = (a.header("x-request-id"), b.header("x-request-id"));
    assert!(a.is_some_and(|a| !a.is_empty()) && b.is_some() && a != b);
}

#[tokio::test]
async fn streams_are_relayed_and_the_added_usage_chunk_is_removed() {
    let (upstream, iris) = setup().await;
    let body = stream_body("test-model");
    let response = iris.chat(KEY_A, &body, &[]).await;
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
    let mut body = stream_body("test-model");
    body["stream_options"] = json!({"include_usage": true});
    let text = iris
        .chat(KEY_A, &body, &[])
        .await
        .text()
        .await
        .expect("body");
    assert!(text.contains("\"usage\":{"), "{text}");
}

/// The length a response declared, if it declared one, and the body.
async fn declared_length(response: reqwest::Response) -> (Option<usize>, Option<String>, usize) {
    let headers = response.headers().clone();
    let header = |name: &str| {
        headers
            .get(name)
            .map(|v| v.to_str().expect("ascii").to_owned())
    };
    let body = response.bytes().await.expect("body");
    (
        header("content-length").map(|v| v.parse().expect("a length")),
        header("transfer-encoding"),
        body.len(),
    )
}

#[tokio::test]
async fn plain_answers_keep_the_upstreams_length_and_streams_stay_chunked() {
    let (_upstream, iris) = setup().await;
    // An answer, and an upstream's error relayed, as the upstream sent them:
    // with their length, not chunked.
    for headers in [&[][..], &[("x-mock-status", "400")][..]] {
        let response = iris.chat(KEY_A, &chat_body("test-model"), headers).await;
        let (length, encoding, received) = declared_length(response).await;
        assert_eq!(length, Some(received), "{headers:?}");
        assert_eq!(encoding, None, "{headers:?}");
    }
    // A stream is edited on its way (the usage chunk Iris asked for is
    // removed): its length is not known in advance.
    let response = iris.chat(KEY_A, &stream_body("test-model"), &[]).await;
    let (length, encoding, _) = declared_length(response).await;
    assert_eq!((length, encoding.as_deref()), (None, Some("chunked")));
}

#[tokio::test]
async fn a_plain_answer_to_a_stream_request_is_relayed_whole() {
    let (_upstream, iris) = setup().await;
    let body = stream_body("test-model");
    let response = iris.chat(KEY_A, &body, &[("x-mock-plain", "1")]).await;
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
    let body = stream_body("test-model");
    let started = Instant::now();
    let response = iris
        .chat(
            KEY_A,
            &body,
            &[("x-mock-chunk-delay-ms", "300"), ("x-mock-chunks", "3")],
        )
        .await;
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
    let body = stream_body("test-model");
    let response = iris
        .chat(
            KEY_A,
            &body,
            &[("x-mock-chunk-delay-ms", "100"), ("x-mock-chunks", "50")],
        )
        .await;
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
    let (upstream, app) = in_process().await;
    let post = async |key: Option<&str>, model: &str| {
        app.post_json("/v1/chat/completions", key, &chat_body(model))
            .await
    };
    let answer = post(None, "test-model").await;
    assert_eq!(
        (answer.status, answer.error()["code"].as_str()),
        (401, Some("invalid_api_key"))
    );
    let answer = post(Some("wrong"), "test-model").await;
    assert_eq!(
        (answer.status, answer.error()["code"].as_str()),
        (401, Some("invalid_api_key"))
    );
    let answer = post(Some(KEY_A), "no-such-model").await;
    let error = answer.error();
    assert_eq!(
        (
            answer.status,
            error["code"].as_str(),
            error["param"].as_str()
        ),
        (404, Some("model_not_found"), Some("model"))
    );
    let answer = post(Some(KEY_B), "test-model").await;
    assert_eq!(
        (answer.status, answer.error()["code"].as_str()),
        (403, Some("model_not_allowed"))
    );
    assert_eq!(post(Some(KEY_B), "other-model").await.status, 200);
    assert_eq!(
        upstream.received().len(),
        1,
        "only the allowed request went upstream"
    );
}

#[tokio::test]
async fn the_responses_api_is_refused_on_every_method_and_path() {
    let (upstream, app) = in_process().await;
    for (method, path) in [
        (Method::POST, "/v1/responses"),
        (Method::GET, "/v1/responses/resp_123"),
        (Method::DELETE, "/v1/responses/resp_123"),
        (Method::GET, "/v1/responses/resp_123/input_items"),
    ] {
        let request = to(method, path, Some(KEY_A))
            .header("content-type", "application/json")
            .body(Body::from(
                json!({"model": "test-model", "input": "hi"}).to_string(),
            ))
            .unwrap();
        let answer = app.send(request).await;
        let error = answer.error();
        assert_eq!(answer.status, 400, "{path}");
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
    let (_upstream, app) = in_process().await;
    let answer = app.get("/v1/moderations", None).await;
    assert_eq!(
        (answer.status, answer.error()["code"].as_str()),
        (404, Some("not_found"))
    );
    for path in ["/v1/chat/completions", "/v1/embeddings"] {
        let answer = app.get(path, None).await;
        answer.error();
        assert_eq!(answer.status, 405, "{path}");
    }
}

#[tokio::test]
async fn models_are_listed_per_client() {
    let (_upstream, app) = in_process().await;
    let a = app.get("/v1/models", Some(KEY_A)).await.json();
    assert_eq!(a["object"], "list");
    let ids: Vec<&str> = a["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, ["test-model", "other-model"]);
    assert_eq!(a["data"][0]["object"], "model");
    let b = app.get("/v1/models", Some(KEY_B)).await.json();
    assert_eq!(b["data"].as_array().map(Vec::len), Some(1));

    let one = app.get("/v1/models/test-model", Some(KEY_A)).await.json();
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
        let answer = app.get(path, key).await;
        assert_eq!(
            (answer.status, answer.error()["code"].as_str()),
            (status, Some(code)),
            "{path}"
        );
    }
}

#[tokio::test]
async fn bad_bodies_are_refused_with_their_param() {
    let (upstream, app) = in_process().await;
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
        let answer = app.post("/v1/chat/completions", Some(KEY_A), body).await;
        let error = answer.error();
        assert_eq!(answer.status, 400, "{body}");
        assert_eq!(error["code"], "invalid_request", "{body}");
        assert_eq!(error["param"].as_str(), param, "{body}");
    }
    let deep = format!(
        r#"{{"model":"test-model","messages":[{{"role":"user","content":"x"}}],"x":{}}}"#,
        "[".repeat(100_000)
    );
    let request = to(Method::POST, "/v1/chat/completions", Some(KEY_A))
        .body(Body::from(deep))
        .unwrap();
    let answer = app.send(request).await;
    answer.error();
    assert_eq!(answer.status, 400);
    assert!(upstream.received().is_empty());
    // Iris is still fine.
    assert_eq!(app.get("/healthz", None).await.status, 200);
}

#[tokio::test]
async fn oversized_bodies_are_refused_with_or_without_a_length() {
    let upstream = MockUpstream::start().await;
    let config = base_config(&upstream.base_url(), "").replace(
        "shutdown_grace_ms = 2000",
        "shutdown_grace_ms = 2000\nmax_body_bytes = 1024",
    );
    let app = App::start(&config).await;
    let big = format!(
        r#"{{"model":"test-model","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(4096)
    );

    let with_length = to(Method::POST, "/v1/chat/completions", Some(KEY_A))
        .header("content-length", big.len())
        .body(Body::from(big.clone()))
        .unwrap();
    let answer = app.send(with_length).await;
    assert_eq!(
        (answer.status, answer.error()["code"].as_str()),
        (413, Some("request_too_large"))
    );

    let chunks: Vec<Result<String, std::io::Error>> = big
        .as_bytes()
        .chunks(100)
        .map(|c| Ok(String::from_utf8_lossy(c).into_owned()))
        .collect();
    let without_length = to(Method::POST, "/v1/chat/completions", Some(KEY_A))
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
        .unwrap();
    let answer = app.send(without_length).await;
    assert_eq!(
        (answer.status, answer.error()["code"].as_str()),
        (413, Some("request_too_large"))
    );
    assert!(upstream.received().is_empty());
}

#[tokio::test]
async fn upstream_errors_pass_through_with_status_and_body() {
    let (_upstream, iris) = setup().await;
    let response = iris
        .chat(KEY_A, &chat_body("test-model"), &[("x-mock-status", "422")])
        .await;
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
    let (status, error) = error_of(iris.chat(KEY_A, &chat_body("test-model"), &[]).await).await;
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
        iris.chat(
            KEY_A,
            &chat_body("test-model"),
            &[("x-mock-delay-ms", "2000")],
        )
        .await,
    )
    .await;
    assert_eq!(
        (status, error["code"].as_str()),
        (504, Some("upstream_timeout"))
    );
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let (_upstream, app) = in_process().await;
    assert_eq!(app.get("/healthz", None).await.status, 200);
    assert_eq!(app.get("/readyz", None).await.status, 200);
    app.post_json(
        "/v1/chat/completions",
        Some(KEY_B),
        &chat_body("other-model"),
    )
    .await;
    let metrics = app.get("/metrics", None).await.text();
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
    let body = stream_body("test-model");
    let response = iris
        .chat(
            KEY_A,
            &body,
            &[("x-mock-chunk-delay-ms", "100"), ("x-mock-chunks", "5")],
        )
        .await;
    let url = iris.url("/healthz");
    iris.begin_shutdown();
    let text = response.text().await.expect("the stream completes");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    iris.join().await.expect("clean stop");
    assert!(http().get(url).send().await.is_err(), "no longer accepting");
}

/// The edge through the real binary: a client's request id that is not
/// short printable ASCII is replaced by one of Iris's, in the answer and
/// the log line (it would reach logs and the upstream); an acceptable one
/// is kept; the upstream's own id never replaces it; an answer in the 5xx range is also logged at error level, for
/// operators who alert on errors.
#[tokio::test]
async fn unfit_request_ids_are_replaced_and_server_errors_logged_by_the_real_binary() {
    let upstream = MockUpstream::start().await;
    let iris = crate::support::binary::Binary::start(&base_config(&upstream.base_url(), "")).await;
    let long = "x".repeat(129);
    for (sent, kept) in [
        ("client-id-7", true),
        ("has space", false),
        (long.as_str(), false),
    ] {
        let response = http()
            .post(iris.url("/v1/chat/completions"))
            .bearer_auth(KEY_A)
            .header("x-request-id", sent)
            // An upstream's answer carries its own id: the client gets its.
            .header("x-mock-set-header", "x-request-id: upstream-id")
            .json(&chat_body("test-model"))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200);
        let id = response.headers()["x-request-id"]
            .to_str()
            .expect("ASCII")
            .to_owned();
        if kept {
            assert_eq!(id, sent);
        } else {
            assert!(
                id.starts_with("req_") && id != sent,
                "{sent:?} became {id:?}"
            );
        }
        assert_eq!(
            upstream.last().headers["x-request-id"],
            id.as_str(),
            "the upstream sees the same id"
        );
    }

    let failed = http()
        .post(iris.url("/v1/chat/completions"))
        .bearer_auth(KEY_A)
        .header("x-mock-status", "500")
        .json(&chat_body("test-model"))
        .send()
        .await
        .expect("request");
    assert_eq!(failed.status(), 500);
    let deadline = Instant::now() + Duration::from_secs(5);
    let logged = loop {
        let logged = iris.logged("response failed");
        if !logged.is_empty() || Instant::now() > deadline {
            break logged;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert_eq!(logged[0]["level"], "ERROR");
    assert_eq!(logged[0]["status"], 500);
    for id in ["has space", long.as_str()] {
        assert!(
            iris.logged("request")
                .iter()
                .all(|line| line["request_id"] != id),
            "an unfit id never reaches the log"
        );
    }
}

/// The server hands a `POST` to the API routes straight to its handler,
/// past the router, which still lists them: both ways answer alike, the
/// upstream's answer and Iris's errors (a wrong key, a bad body, a model
/// of the other API), with the same headers.
#[tokio::test]
async fn the_api_routes_answer_alike_past_the_router_and_through_it() {
    let upstream = MockUpstream::start().await;
    let config = base_config(&upstream.base_url(), "");
    let state = std::sync::Arc::new(crate::support::state(&config).await);
    let direct = iris::app::app(std::sync::Arc::clone(&state));
    let routed = iris::app::router(state);
    let requests = [
        ("/v1/chat/completions", Some(KEY_A), chat_body("test-model")),
        (
            "/v1/chat/completions",
            Some("wrong-key"),
            chat_body("test-model"),
        ),
        ("/v1/chat/completions", None, chat_body("test-model")),
        (
            "/v1/chat/completions",
            Some(KEY_A),
            json!({"model": "test-model"}),
        ),
        (
            "/v1/embeddings",
            Some(KEY_A),
            json!({"model": "test-model", "input": "hi"}),
        ),
    ];
    for (path, key, body) in requests {
        let request = || {
            to(Method::POST, path, key)
                .header("content-type", "application/json")
                .body(Body::from(body.to_string()))
                .expect("request")
        };
        let past = answer_of(direct.serve(request()).await).await;
        let through = answer_of(
            tower::ServiceExt::oneshot(routed.clone(), request())
                .await
                .unwrap_or_else(|never| match never {}),
        )
        .await;
        assert_eq!(past, through, "{path} {key:?} {body}");
    }
}

/// A response's status, header names (values vary: ids, dates, resets),
/// declared length and body as JSON. The length is the `Content-Length`
/// the router sets from the body's exact size, or that size, from which
/// hyper writes the same header on the wire.
async fn answer_of(response: axum::response::Response) -> (u16, Vec<String>, Option<u64>, Value) {
    use http_body::Body as _;
    let status = response.status().as_u16();
    let mut names: Vec<String> = (response.headers().keys())
        .filter(|name| *name != "content-length")
        .map(|name| name.to_string())
        .collect();
    names.sort();
    let length = match response.headers().get("content-length") {
        Some(length) => length.to_str().ok().and_then(|l| l.parse().ok()),
        None => response.body().size_hint().exact(),
    };
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("body");
    let body = serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    (status, names, length, body)
}
