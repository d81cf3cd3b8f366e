//! The demo upstream (`[[upstreams]] kind = "demo"`): a stand-in model that
//! Iris answers itself, in-process, so the shipped config works end to end
//! with no upstream account: plain and streamed answers, usage, and a
//! description of the images it received (after Iris's rewrite, so the
//! demo shows what an upstream would get); and embeddings, small vectors
//! derived from each input's bytes (the same input, the same vector).
//!
//! It is not a model: it says what it received. A config without a demo
//! upstream never runs this code.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Value, json};

use super::{BodyError, Chunks, Reply};
use crate::openai::Api;

use crate::images::data_uri::DataUri;
use crate::images::{dimensions, sniff};

/// The pause between streamed chunks, so a stream is visibly a stream.
const CHUNK_PAUSE: Duration = Duration::from_millis(30);

/// The demo's answer to a request body of `api`, as an upstream's response.
pub fn answer(api: Api, body: &[u8]) -> Reply {
    match api {
        Api::Chat => chat(body),
        Api::Embeddings => embeddings(body),
    }
}

/// How many numbers the demo's embedding of one input has.
const DEMO_DIMENSIONS: usize = 8;

/// The demo's embeddings: for each input, [`DEMO_DIMENSIONS`] numbers in
/// [-1, 1] from a hash of its text (or token ids), as floats or, when
/// `encoding_format` is `"base64"`, as little-endian f32 bytes in base64
/// (what the OpenAI SDKs ask for by default). Usage: a token per 4 bytes.
fn embeddings(body: &[u8]) -> Reply {
    use base64::Engine as _;
    let request: Value = serde_json::from_slice(body).unwrap_or_default();
    let model = request["model"].as_str().unwrap_or("demo").to_owned();
    let inputs: Vec<String> = match &request["input"] {
        Value::Array(items) if items.iter().all(Value::is_number) => {
            vec![request["input"].to_string()]
        }
        Value::Array(items) => items
            .iter()
            .map(|item| {
                item.as_str()
                    .map_or_else(|| item.to_string(), str::to_owned)
            })
            .collect(),
        other => vec![other.as_str().unwrap_or_default().to_owned()],
    };
    let base64 = request["encoding_format"] == "base64";
    let mut prompt_tokens = 0u64;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            prompt_tokens += (input.len() as u64).div_ceil(4).max(1);
            let vector = demo_vector(input);
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    let body = json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    });
    response(
        "application/json",
        futures_util::stream::iter([Ok(Bytes::from(body.to_string()))]).boxed(),
    )
}

/// [`DEMO_DIMENSIONS`] numbers in [-1, 1], a function of `input` alone.
fn demo_vector(input: &str) -> Vec<f32> {
    // FNV-1a, then a xorshift per dimension: stable across runs and builds.
    let mut state = input.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (0..DEMO_DIMENSIONS)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // The top 24 bits, as a fraction in [0, 1), stretched to [-1, 1).
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// The demo's answer to a chat completion body.
fn chat(body: &[u8]) -> Reply {
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
        length: None,
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
        let response = answer(
            Api::Chat,
            br#"{"model":"demo","messages":[{"role":"user","content":"Hi there"}]}"#,
        );
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
            Api::Chat,
            br#"{"model":"demo","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Hello"}]}"#,
        );
        assert_eq!(response.headers["content-type"], "text/event-stream");
        let text = body(response).await;
        let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert!(events.len() > 4, "{text}");
        assert_eq!(*events.last().expect("events"), "data: [DONE]");
        assert!(events[events.len() - 2].contains("\"usage\""), "{text}");
    }

    #[tokio::test]
    async fn embeds_each_input_as_floats_or_base64() {
        let floats = answer(Api::Embeddings, br#"{"model":"e","input":["a","bb"]}"#);
        let json: Value = serde_json::from_str(&body(floats).await).expect("json");
        let data = json["data"].as_array().expect("data");
        assert_eq!(data.len(), 2);
        assert_eq!(data[1]["index"], 1);
        let vector = data[0]["embedding"].as_array().expect("floats");
        assert_eq!(vector.len(), DEMO_DIMENSIONS);
        assert!(
            vector
                .iter()
                .all(|x| x.as_f64().is_some_and(|x| (-1.0..=1.0).contains(&x)))
        );
        assert_eq!(json["usage"]["prompt_tokens"], 2);

        let encoded = answer(
            Api::Embeddings,
            br#"{"model":"e","input":"a","encoding_format":"base64"}"#,
        );
        let json: Value = serde_json::from_str(&body(encoded).await).expect("json");
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(json["data"][0]["embedding"].as_str().expect("base64"))
            .expect("decodes");
        assert_eq!(bytes.len(), DEMO_DIMENSIONS * 4);
        let first = f32::from_le_bytes(bytes[..4].try_into().expect("four bytes"));
        assert_eq!(
            f64::from(first),
            vector[0].as_f64().expect("float") as f32 as f64
        );
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
