//! `POST /v1/embeddings` through the real server: forwarded to the
//! upstream's `/embeddings` with every field as sent (the model renamed),
//! the answer back untouched, routed over deployments like chat, reserved
//! and charged against the same budgets (the upstream's count settles it),
//! logged with its endpoint, and refused with a clear error when the model
//! serves the other API or the input is not one OpenAI takes.

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::mock_upstream::Fault;
use crate::support::{
    Iris, KEY_A, MockUpstream, admin_toml, base_config, eventually, http, metric_sum,
    status_and_json,
};

/// [`base_config`] with an embeddings model `embed` (renamed upstream),
/// and `extra`.
fn config(upstream: &str, extra: &str) -> String {
    base_config(
        upstream,
        &format!(
            r#"
[[models]]
name = "embed"
endpoint = "embeddings"
upstream = "mock"
upstream_model = "text-embedding-3-small"
{extra}"#
        ),
    )
}

#[tokio::test]
async fn embeddings_go_upstream_as_sent_and_come_back_untouched() {
    let upstream = MockUpstream::start().await;
    let iris = Iris::start(&config(&upstream.base_url(), "")).await;
    let sent = r#"{"model":"embed","input":["first text","second"],"encoding_format":"base64", "dimensions":3,"user":"u-1","x_provider_field":{"keep":[1,2]}}"#;
    let response = http()
        .post(iris.url("/v1/embeddings"))
        .bearer_auth(KEY_A)
        .header("content-type", "application/json")
        .body(sent)
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-request-id"));
    assert_eq!(response.headers()["x-iris-upstream"], "mock");
    let answer: Value = response.json().await.expect("JSON");

    let received = upstream.last();
    assert_eq!(
        std::str::from_utf8(&received.body).expect("UTF-8"),
        sent.replace(r#""model":"embed""#, r#""model":"text-embedding-3-small""#),
        "only the model changes on the way up"
    );
    assert!(
        received
            .headers
            .get("authorization")
            .is_some_and(|v| v == "Bearer upstream-secret-key")
    );
    // The mock's answer, as it made it: two base64 vectors of 3 floats.
    assert_eq!(answer["object"], "list");
    assert_eq!(answer["model"], "text-embedding-3-small");
    let data = answer["data"].as_array().expect("data");
    assert_eq!(data.len(), 2);
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data[1]["embedding"].as_str().expect("base64 text"))
        .expect("base64");
    assert_eq!(bytes.len(), 3 * 4, "three little-endian f32s");
    assert_eq!(answer["usage"]["prompt_tokens"], 3 + 2);

    // Floats, when asked for.
    let response = iris
        .embed(KEY_A, &json!({"model": "embed", "input": "hello"}), &[])
        .await;
    let (status, answer) = status_and_json(response).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["data"][0]["embedding"].as_array().map(Vec::len),
        Some(4)
    );
}

#[tokio::test]
async fn a_model_serves_only_its_own_api() {
    let upstream = MockUpstream::start().await;
    let iris = Iris::start(&config(&upstream.base_url(), "")).await;

    let response = iris
        .embed(
            KEY_A,
            &json!({"model": "test-model", "input": "hello"}),
            &[],
        )
        .await;
    let (status, answer) = status_and_json(response).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["code"], "model_not_supported");
    assert_eq!(answer["error"]["param"], "model");
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("POST /v1/chat/completions"), "{message}");

    let response = iris
        .chat(KEY_A, &crate::support::chat_body("embed"), &[])
        .await;
    let (status, answer) = status_and_json(response).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["code"], "model_not_supported");
    assert_eq!(answer["error"]["param"], "model");
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("POST /v1/embeddings"), "{message}");

    // Unknown and forbidden models answer as on chat.
    let response = iris
        .embed(KEY_A, &json!({"model": "nope", "input": "a"}), &[])
        .await;
    assert_eq!(
        status_and_json(response).await.1["error"]["code"],
        "model_not_found"
    );
    let response = iris
        .embed(
            crate::support::KEY_B,
            &json!({"model": "embed", "input": "a"}),
            &[],
        )
        .await;
    assert_eq!(
        status_and_json(response).await.1["error"]["code"],
        "model_not_allowed"
    );
    assert_eq!(upstream.requests(), 0, "nothing went upstream");
}

#[tokio::test]
async fn input_of_another_shape_is_refused_before_anything_is_sent() {
    let upstream = MockUpstream::start().await;
    let iris = Iris::start(&config(&upstream.base_url(), "")).await;
    for input in [
        json!(42),
        json!(null),
        json!({"text": "a"}),
        json!([]),
        json!(""),
        json!(["a", 1]),
        json!([["a"]]),
        json!([[]]),
        json!([1.5]),
    ] {
        let response = iris
            .embed(KEY_A, &json!({"model": "embed", "input": input}), &[])
            .await;
        let (status, answer) = status_and_json(response).await;
        assert_eq!(status, 400, "{input}: {answer}");
        assert_eq!(answer["error"]["code"], "invalid_request", "{input}");
        assert_eq!(answer["error"]["param"], "input", "{input}");
    }
    let response = iris.embed(KEY_A, &json!({"model": "embed"}), &[]).await;
    assert_eq!(status_and_json(response).await.1["error"]["param"], "input");
    // Token arrays are input too.
    for input in [json!([1, 2, 3]), json!([[1, 2], [3]])] {
        let response = iris
            .embed(KEY_A, &json!({"model": "embed", "input": input}), &[])
            .await;
        assert_eq!(response.status(), 200, "{input}");
    }
    assert_eq!(
        upstream.requests(),
        2,
        "only the two good ones went upstream"
    );
}

#[tokio::test]
async fn the_input_is_reserved_and_the_upstreams_count_is_charged() {
    let upstream = MockUpstream::start().await;
    let budget = "\n[clients.budget]\ntokens_per_day = 1000\n";
    // Client a's budget goes right after its key line.
    let config = config(&upstream.base_url(), "").replacen(
        &format!("key = \"{}\"\n", iris::keys::KeyHash::of(KEY_A)),
        &format!("key = \"{}\"{budget}", iris::keys::KeyHash::of(KEY_A)),
        1,
    );
    let iris = Iris::start(&config).await;

    // The upstream says 37: 37 is charged, whatever Iris estimated.
    let response = iris
        .embed(
            KEY_A,
            &json!({"model": "embed", "input": ["one", "two"]}),
            &[(
                "x-mock-usage",
                r#"{"prompt_tokens": 37, "total_tokens": 37}"#,
            )],
        )
        .await;
    assert_eq!(response.status(), 200);
    let _ = response.bytes().await;
    iris.settled(KEY_A).await;
    assert_eq!(iris.used(KEY_A, "tokens_per_day").await, 37);

    // An input larger than what is left (963 tokens) is refused before it
    // is sent: 2000 words are at least 2000 tokens.
    let long = "word ".repeat(2000);
    let before = upstream.requests();
    let response = iris
        .embed(KEY_A, &json!({"model": "embed", "input": [long]}), &[])
        .await;
    let (status, answer) = status_and_json(response).await;
    assert_eq!(status, 429, "{answer}");
    assert_eq!(answer["error"]["code"], "insufficient_quota", "{answer}");
    assert_eq!(upstream.requests(), before, "nothing went upstream");
    // Token arrays count as their length: 964 ids do not fit either, 963 do.
    let ids = |n: usize| json!({"model": "embed", "input": vec![1; n]});
    assert_eq!(iris.embed(KEY_A, &ids(964), &[]).await.status(), 429);
    let response = iris
        .embed(
            KEY_A,
            &ids(963),
            &[(
                "x-mock-usage",
                r#"{"prompt_tokens": 963, "total_tokens": 963}"#,
            )],
        )
        .await;
    assert_eq!(response.status(), 200);
    let _ = response.bytes().await;
    iris.settled(KEY_A).await;
    assert_eq!(iris.used(KEY_A, "tokens_per_day").await, 1000);
}

#[tokio::test]
async fn embeddings_fail_over_like_chat() {
    let (first, second) = (MockUpstream::start().await, MockUpstream::start().await);
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"

[store]
kind = "memory"

[routing]
backoff_ms = 1

[[upstreams]]
name = "first"
base_url = "{first}"

[[upstreams]]
name = "second"
base_url = "{second}"

[[models]]
name = "embed"
endpoint = "embeddings"
deployments = [{{ upstream = "first" }}, {{ upstream = "second", priority = 1 }}]

[[clients]]
name = "a"
key = "{key}"
"#,
        first = first.base_url(),
        second = second.base_url(),
        key = iris::keys::KeyHash::of(KEY_A),
    );
    let iris = Iris::start(&config).await;
    first.fail_next(1, Fault::status(503));
    let response = iris
        .embed(KEY_A, &json!({"model": "embed", "input": "a"}), &[])
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-iris-upstream"], "second");
    assert_eq!(response.headers()["x-iris-attempts"], "2");
    assert_eq!((first.requests(), second.requests()), (1, 1));
    assert_eq!(second.last().json()["input"], "a");

    // An upstream error is passed through as the upstream sent it, once
    // every deployment has failed.
    first.fail_always(Fault::status(500));
    second.fail_always(Fault::status(500));
    let response = iris
        .embed(KEY_A, &json!({"model": "embed", "input": "a"}), &[])
        .await;
    let (status, answer) = status_and_json(response).await;
    assert_eq!(status, 500, "{answer}");
    assert_eq!(answer["error"]["code"], "mock_error");
}

#[tokio::test]
async fn embeddings_are_listed_logged_and_counted_by_their_endpoint() {
    let upstream = MockUpstream::start().await;
    // Its own model, so that the process-wide metrics of the other tests'
    // requests do not count here.
    let extra = format!(
        "\n[[models]]\nname = \"embed-logged\"\nendpoint = \"embeddings\"\nupstream = \"mock\"\n{}",
        admin_toml()
    );
    let iris = Iris::start(&config(&upstream.base_url(), &extra)).await;

    let models: Value = http()
        .get(iris.url("/v1/models"))
        .bearer_auth(KEY_A)
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("JSON");
    let ids: Vec<&str> = models["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert!(
        ids.contains(&"embed") && ids.contains(&"test-model"),
        "{ids:?}"
    );

    for _ in 0..2 {
        let response = iris
            .embed(
                KEY_A,
                &json!({"model": "embed-logged", "input": "a"}),
                &[("x-mock-usage", r#"{"prompt_tokens": 5, "total_tokens": 5}"#)],
            )
            .await;
        assert_eq!(response.status(), 200);
        let _ = response.bytes().await;
    }
    assert_eq!(iris.chat_status(KEY_A, "test-model").await, 200);
    let response = iris
        .embed(KEY_A, &json!({"model": "embed-logged", "input": []}), &[])
        .await;
    assert_eq!(response.status(), 400);

    let mut report = Value::Null;
    eventually(
        std::time::Duration::from_secs(10),
        "four records in the spend log",
        async || {
            let (status, answer) = iris
                .admin(Method::GET, "/admin/usage?since=0d&by=endpoint", None)
                .await;
            assert_eq!(status, 200, "{answer}");
            report = answer;
            report["total"]["requests"] == 4
        },
    )
    .await;
    let rows = report["data"].as_array().expect("rows");
    let embeddings = rows
        .iter()
        .find(|row| row["endpoint"] == "embeddings")
        .unwrap_or_else(|| panic!("no embeddings row: {report}"));
    assert_eq!(embeddings["requests"], 3);
    assert_eq!(embeddings["errors"], 1);
    assert_eq!(embeddings["prompt_tokens"], 10);
    assert_eq!(embeddings["completion_tokens"], 0);
    assert!(
        rows.iter()
            .any(|row| row["endpoint"] == "chat" && row["requests"] == 1),
        "{report}"
    );

    let metrics = iris.metrics().await;
    assert_eq!(
        metric_sum(
            &metrics,
            "iris_requests_total",
            &[
                "route=\"/v1/embeddings\"",
                "model=\"embed-logged\"",
                "status=\"200\""
            ]
        ),
        2.0,
        "{metrics}"
    );
}
