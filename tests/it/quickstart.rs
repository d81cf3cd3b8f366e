//! The front door: the shipped `config/iris.toml`, as a new user runs it,
//! answers the README's quickstart with its built-in demo upstream: text, a
//! streamed answer, an inline image (converted for the upstream), a 429
//! from the tiny demo budget, and `iris usage` afterwards.

use std::process::Command;

use crate::support::{Iris, http};

/// The shipped config, on a free port and a temporary database.
fn shipped_config(db: &std::path::Path) -> String {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/iris.toml"))
        .expect("config/iris.toml");
    assert!(text.contains("path = \"iris.db\"") && text.contains("127.0.0.1:8080"));
    text.replace(
        "path = \"iris.db\"",
        &format!("path = {:?}", db.display().to_string()),
    )
    .replace("127.0.0.1:8080", "127.0.0.1:0")
}

async fn chat(iris: &Iris, key: &str, body: serde_json::Value) -> reqwest::Response {
    http()
        .post(iris.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .expect("request")
}

#[tokio::test]
async fn the_shipped_config_answers_the_quickstart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("iris.db");
    let config = shipped_config(&db);
    let iris = Iris::start(&config).await;

    // Text.
    let response = chat(
        &iris,
        "iris-demo-key",
        serde_json::json!({"model": "demo", "messages": [{"role": "user", "content": "Hello"}]}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let answer: serde_json::Value = response.json().await.expect("json");
    assert!(
        answer["choices"][0]["message"]["content"]
            .as_str()
            .is_some_and(|c| c.contains("You said: \"Hello\"")),
        "{answer}"
    );
    assert!(answer["usage"]["total_tokens"].as_u64().is_some());

    // Streamed: several chunks, no usage chunk (the client did not ask), [DONE].
    let response = chat(
        &iris,
        "iris-demo-key",
        serde_json::json!({"model": "demo", "stream": true, "messages": [{"role": "user", "content": "Hello"}]}),
    )
    .await;
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let text = response.text().await.expect("stream");
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert!(events.len() >= 4, "{text}");
    assert!(
        !text.contains("\"usage\""),
        "Iris removes the usage chunk it asked for"
    );
    assert_eq!(events.last().copied(), Some("data: [DONE]"));

    // An inline GIF, which the demo upstream does not take: converted to PNG.
    let gif = "data:image/gif;base64,R0lGODlhAQABAIAAAP///wAAACH5BAEAAAAALAAAAAABAAEAAAICRAEAOw==";
    let response = chat(
        &iris,
        "iris-demo-key",
        serde_json::json!({"model": "demo", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is in this image?"},
            {"type": "image_url", "image_url": {"url": gif, "detail": "low"}}]}]}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let answer: serde_json::Value = response.json().await.expect("json");
    assert!(
        answer["choices"][0]["message"]["content"]
            .as_str()
            .is_some_and(|c| c.contains("1 image(s): png, 1x1 pixels")),
        "{answer}"
    );

    // Embeddings, from the demo upstream too.
    let embedded = crate::support::http()
        .post(iris.url("/v1/embeddings"))
        .bearer_auth("iris-demo-key")
        .json(&serde_json::json!({"model": "demo-embed", "input": ["first document", "second document"]}))
        .send()
        .await
        .expect("POST /v1/embeddings");
    assert_eq!(embedded.status(), 200);
    let answer: serde_json::Value = embedded.json().await.expect("json");
    assert_eq!(answer["data"].as_array().map(Vec::len), Some(2), "{answer}");
    assert_eq!(
        answer["data"][0]["embedding"].as_array().map(Vec::len),
        Some(8)
    );

    // The tiny client: two requests a minute, then a 429 the SDKs retry on.
    let tiny = || serde_json::json!({"model": "demo", "max_tokens": 20, "messages": [{"role": "user", "content": "Hi"}]});
    for _ in 0..2 {
        assert_eq!(chat(&iris, "iris-tiny-key", tiny()).await.status(), 200);
    }
    let refused = chat(&iris, "iris-tiny-key", tiny()).await;
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    let error: serde_json::Value = refused.json().await.expect("json");
    assert_eq!(error["error"]["code"], "rate_limit_exceeded");

    // `iris usage`, from the store the server wrote at shutdown.
    iris.stop().await.expect("stopped");
    let config_path = dir.path().join("iris.toml");
    std::fs::write(&config_path, &config).expect("write config");
    let output = Command::new(env!("CARGO_BIN_EXE_iris"))
        .args(["usage", "--config"])
        .arg(&config_path)
        .output()
        .expect("iris usage");
    assert!(output.status.success(), "{output:?}");
    let report = String::from_utf8_lossy(&output.stdout);
    let tiny_day = report
        .lines()
        .find(|l| l.starts_with("tiny") && l.contains("tokens_per_day"))
        .unwrap_or_else(|| panic!("no tiny row in {report}"));
    let used: u64 = tiny_day
        .split_whitespace()
        .nth(3)
        .and_then(|n| n.parse().ok())
        .expect("used");
    assert!(used > 0, "{report}");
}
