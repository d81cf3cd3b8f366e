//! The demo upstream (`[[upstreams]] kind = "demo"`): a stand-in model that
//! Iris answers itself, in-process, so the shipped config works end to end
//! with no upstream account: plain and streamed answers, usage, and a
//! description of the images it received (after Iris's rewrite, so the
//! demo shows what an upstream would get).
//!
//! It is not a model: it says what it received. A config without a demo
//! upstream never runs this code.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Value, json};

use super::{BodyError, Chunks, Reply};

use crate::images::data_uri::DataUri;
use crate::images::{dimensions, sniff};

/// The pause between streamed chunks, so a stream is visibly a stream.
const CHUNK_PAUSE: Duration = Duration::from_millis(30);

/// The demo's answer to a chat completion body, as an upstream's response.
pub fn answer(body: &[u8]) -> Reply {
    let request: Value = serde_json::from_slice(body).unwrap_or_default();
    let model = request["model"].as_str().unwrap_or("demo").to_owned();
    let text = reply(&request);
    let prompt_tokens = (body.len() as u64).div_ceil(4);
    let words: Vec<String> = text.split_inclusive(' ').map(str::to_owned).collect();
    let completion_tokens = words.len() as u64;
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    });

    if request["stream"].as_bool() != Some(true) {
        let body = json!({
            "id": "chatcmpl-iris-demo",
            "object": "chat.completion",
            "created": created(),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": usage,
        });
        return response(
            "application/json",
            futures_util::stream::iter([Ok(Bytes::from(body.to_string()))]).boxed(),
        );
    }

    let include_usage = request["stream_options"]["include_usage"].as_bool() == Some(true);
    let chunk = |delta: Value, finish: Option<&str>| {
        json!({"id": "chatcmpl-iris-demo", "object": "chat.completion.chunk", "created": created(),
            "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let mut events = vec![chunk(json!({"role": "assistant", "content": ""}), None)];
    // A few words per chunk, as a model would send them.
    events.extend(
        words
            .chunks(3)
            .map(|piece| chunk(json!({"content": piece.concat()}), None)),
    );
    events.push(chunk(json!({}), Some("stop")));
    if include_usage {
        events.push(
            json!({"id": "chatcmpl-iris-demo", "object": "chat.completion.chunk",
            "created": created(), "model": model, "choices": [], "usage": usage}),
        );
    }
    let mut lines: Vec<Bytes> = events
        .into_iter()
        .map(|event| Bytes::from(format!("data: {event}\n\n")))
        .collect();
    lines.push(Bytes::from_static(b"data: [DONE]\n\n"));
    let stream =
        futures_util::stream::iter(lines.into_iter().enumerate()).then(|(i, line)| async move {
            if i > 0 {
                tokio::time::sleep(CHUNK_PAUSE).await;
            }
            Ok::<_, BodyError>(line)
        });
    response("text/event-stream", stream.boxed())
}

fn response(content_type: &'static str, body: Chunks) -> Reply {
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    Reply {
        status: http::StatusCode::OK,
        headers,
        body,
    }
}

fn created() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What the demo says: what it received, the last user message and images.
fn reply(request: &Value) -> String {
    let messages = request["messages"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    let mut said = String::new();
    let mut images = Vec::new();
    for message in messages {
        match &message["content"] {
            Value::String(text) if message["role"] == "user" => said = text.clone(),
            Value::Array(parts) => {
                for part in parts {
                    match part["type"].as_str() {
                        Some("text") if message["role"] == "user" => {
                            said = part["text"].as_str().unwrap_or("").to_owned();
                        }
                        Some("image_url") => {
                            images.push(describe_image(
                                part["image_url"]["url"].as_str().unwrap_or(""),
                            ));
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let said: String = said.chars().take(200).collect();
    let mut text = format!("Hello from Iris's demo upstream! You said: \"{said}\".");
    if !images.is_empty() {
        text.push_str(&format!(
            " I received {} image(s): {}.",
            images.len(),
            images.join("; ")
        ));
    }
    text
}

/// An image as the upstream would see it.
fn describe_image(url: &str) -> String {
    let Ok(uri) = DataUri::parse(url) else {
        return "a URL".to_owned();
    };
    use base64::Engine as _;
    let bytes = if uri.base64 {
        base64::engine::general_purpose::STANDARD
            .decode(uri.data.trim_end())
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    let format = sniff::format(&bytes).map_or("not an image", |f| f.name());
    match dimensions(&bytes) {
        Some((w, h)) => format!("{format}, {w}x{h} pixels, {} bytes inline", bytes.len()),
        None => format!("{format}, {} bytes inline", bytes.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body(response: Reply) -> String {
        let chunks: Vec<Bytes> = response.body.map(|c| c.expect("chunk")).collect().await;
        String::from_utf8(chunks.concat()).expect("text")
    }

    #[tokio::test]
    async fn answers_plainly_with_usage() {
        let response =
            answer(br#"{"model":"demo","messages":[{"role":"user","content":"Hi there"}]}"#);
        assert_eq!(response.headers["content-type"], "application/json");
        let json: Value = serde_json::from_str(&body(response).await).expect("json");
        assert!(
            json["choices"][0]["message"]["content"]
                .as_str()
                .is_some_and(|c| c.contains("You said: \"Hi there\"")),
            "{json}"
        );
        assert!(
            json["usage"]["total_tokens"]
                .as_u64()
                .is_some_and(|t| t > 0)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn streams_in_chunks_with_usage_when_asked() {
        let response = answer(
            br#"{"model":"demo","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Hello"}]}"#,
        );
        assert_eq!(response.headers["content-type"], "text/event-stream");
        let text = body(response).await;
        let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert!(events.len() > 4, "{text}");
        assert_eq!(*events.last().expect("events"), "data: [DONE]");
        assert!(events[events.len() - 2].contains("\"usage\""), "{text}");
    }

    #[test]
    fn describes_inline_images() {
        let png = crate::images::test_png(3, 2);
        use base64::Engine as _;
        let uri = format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(&png)
        );
        let request = json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": uri}}]}]});
        let text = reply(&request);
        assert!(text.contains("1 image(s): png, 3x2 pixels"), "{text}");
    }
}
