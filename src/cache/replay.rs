//! A cached answer as the request that hit it wants it. The key leaves
//! `stream` out, so an answer stored as one form may be asked for as the
//! other:
//!
//! | stored | asked | replayed |
//! |---|---|---|
//! | JSON | plain | the body byte for byte, with its content type |
//! | stream | stream | its events, then `data: [DONE]` |
//! | stream | plain | its chunks assembled into one `chat.completion` |
//! | JSON | stream | split into chunks: role and content, tool calls, finish, then `[DONE]` |
//!
//! A replayed stream carries the usage chunk only when the request asked
//! for it (`stream_options.include_usage`) and the answer had one.

use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::entry::{Entry, Form, sse_data};

/// What a hit answers: the body and its content type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replayed {
    pub content_type: String,
    pub body: Bytes,
}

const EVENT_STREAM: &str = "text/event-stream";
const JSON: &str = "application/json";

impl Replayed {
    /// Replayed as an event stream (else a plain JSON answer).
    pub fn is_stream(&self) -> bool {
        self.content_type == EVENT_STREAM
    }
}

/// `entry` for a request that asked for a stream (`stream`) and maybe its
/// usage chunk; `None` when the entry cannot be read as its form says
/// (then the request is served as a miss).
pub fn replay(entry: &Entry, stream: bool, include_usage: bool) -> Option<Replayed> {
    match (entry.form, stream) {
        (Form::Json, false) => Some(Replayed {
            content_type: entry.content_type.clone(),
            body: entry.body.clone(),
        }),
        (Form::Stream, true) => Some(events(&entry.body, include_usage)),
        (Form::Stream, false) => assemble(&entry.body),
        (Form::Json, true) => split(&entry.body, include_usage),
    }
}

/// Whether a chunk carries usage and no choices: the usage chunk.
fn is_usage_chunk(chunk: &Value) -> bool {
    chunk.get("usage").is_some_and(|u| !u.is_null())
        && chunk
            .get("choices")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty)
}

fn event(out: &mut Vec<u8>, payload: &[u8]) {
    for line in payload.split(|&b| b == b'\n') {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    out.push(b'\n');
}

fn done(mut out: Vec<u8>) -> Replayed {
    out.extend_from_slice(b"data: [DONE]\n\n");
    Replayed {
        content_type: EVENT_STREAM.to_owned(),
        body: Bytes::from(out),
    }
}

/// A stored stream's events, without its `[DONE]` (one is added at the
/// end) and without its usage chunk unless asked for.
fn events(body: &[u8], include_usage: bool) -> Replayed {
    let mut out = Vec::with_capacity(body.len() + 16);
    for payload in sse_data(body) {
        if payload.trim_ascii() == b"[DONE]" {
            continue;
        }
        if !include_usage
            && serde_json::from_slice::<Value>(&payload).is_ok_and(|chunk| is_usage_chunk(&chunk))
        {
            continue;
        }
        event(&mut out, &payload);
    }
    done(out)
}

/// One choice of a stream, as its chunks build it.
#[derive(Default)]
struct Assembled {
    role: Option<Value>,
    content: Option<String>,
    refusal: Option<String>,
    /// By their `index`: the call's fields, its name and arguments
    /// concatenated across chunks.
    tool_calls: Vec<(u64, Map<String, Value>)>,
    finish_reason: Value,
    logprobs: Value,
}

fn append(slot: &mut Option<String>, piece: Option<&Value>) {
    if let Some(text) = piece.and_then(Value::as_str) {
        slot.get_or_insert_with(String::new).push_str(text);
    }
}

impl Assembled {
    fn add(&mut self, choice: &Value) {
        let delta = &choice["delta"];
        if let Some(role) = delta.get("role").filter(|r| !r.is_null()) {
            self.role = Some(role.clone());
        }
        append(&mut self.content, delta.get("content"));
        append(&mut self.refusal, delta.get("refusal"));
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            self.add_tool_call(call);
        }
        if let Some(reason) = choice.get("finish_reason").filter(|r| !r.is_null()) {
            self.finish_reason = reason.clone();
        }
        if let Some(logprobs) = choice.get("logprobs").filter(|l| !l.is_null()) {
            self.logprobs = logprobs.clone();
        }
    }

    fn add_tool_call(&mut self, piece: &Value) {
        let index = piece["index"].as_u64().unwrap_or(0);
        let at = match self.tool_calls.iter().position(|(i, _)| *i == index) {
            Some(at) => at,
            None => {
                self.tool_calls.push((index, Map::new()));
                self.tool_calls.len() - 1
            }
        };
        let call = &mut self.tool_calls[at].1;
        for field in ["id", "type"] {
            if let Some(value) = piece.get(field).filter(|v| !v.is_null()) {
                call.insert(field.to_owned(), value.clone());
            }
        }
        if let Some(function) = piece.get("function").and_then(Value::as_object) {
            let entry = call
                .entry("function")
                .or_insert_with(|| Value::Object(Map::new()));
            if let Some(target) = entry.as_object_mut() {
                for (field, value) in function {
                    let Some(text) = value.as_str() else { continue };
                    let slot = target
                        .entry(field.clone())
                        .or_insert_with(|| Value::String(String::new()));
                    if let Value::String(existing) = slot {
                        existing.push_str(text);
                    }
                }
            }
        }
    }

    fn message(self) -> Value {
        let mut message = Map::new();
        message.insert(
            "role".into(),
            self.role.unwrap_or_else(|| json!("assistant")),
        );
        message.insert(
            "content".into(),
            self.content.map_or(Value::Null, Value::String),
        );
        if let Some(refusal) = self.refusal {
            message.insert("refusal".into(), Value::String(refusal));
        }
        if !self.tool_calls.is_empty() {
            let calls = self
                .tool_calls
                .into_iter()
                .map(|(_, call)| Value::Object(call))
                .collect();
            message.insert("tool_calls".into(), Value::Array(calls));
        }
        Value::Object(message)
    }
}

/// The fields a completion and each of its chunks share, carried across
/// when one form is replayed as the other.
const HEAD_FIELDS: [&str; 5] = [
    "id",
    "created",
    "model",
    "system_fingerprint",
    "service_tier",
];

/// A stored stream as one `chat.completion`: the first chunk's id,
/// created, model and system fingerprint, each choice's deltas joined, the
/// usage chunk's usage.
fn assemble(body: &[u8]) -> Option<Replayed> {
    let mut head = Map::new();
    let mut choices: Vec<(u64, Assembled)> = Vec::new();
    let mut usage = None;
    for payload in sse_data(body) {
        if payload.trim_ascii() == b"[DONE]" {
            continue;
        }
        let chunk: Value = serde_json::from_slice(&payload).ok()?;
        for field in HEAD_FIELDS {
            if let Some(value) = chunk.get(field).filter(|v| !v.is_null()) {
                head.entry(field).or_insert_with(|| value.clone());
            }
        }
        if let Some(found) = chunk.get("usage").filter(|u| !u.is_null()) {
            usage = Some(found.clone());
        }
        for choice in chunk["choices"].as_array().into_iter().flatten() {
            let index = choice["index"].as_u64().unwrap_or(0);
            let at = match choices.iter().position(|(i, _)| *i == index) {
                Some(at) => at,
                None => {
                    choices.push((index, Assembled::default()));
                    choices.len() - 1
                }
            };
            choices[at].1.add(choice);
        }
    }
    choices.sort_by_key(|(index, _)| *index);
    let mut completion = head;
    completion.insert("object".into(), json!("chat.completion"));
    let choices: Vec<Value> = choices
        .into_iter()
        .map(|(index, choice)| {
            let finish_reason = choice.finish_reason.clone();
            let logprobs = choice.logprobs.clone();
            json!({
                "index": index,
                "message": choice.message(),
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            })
        })
        .collect();
    completion.insert("choices".into(), Value::Array(choices));
    if let Some(usage) = usage {
        completion.insert("usage".into(), usage);
    }
    let body = serde_json::to_vec(&Value::Object(completion)).ok()?;
    Some(Replayed {
        content_type: JSON.to_owned(),
        body: Bytes::from(body),
    })
}

/// A stored `chat.completion` as the chunks a stream of it would have
/// sent: per choice its role and content (and refusal), its tool calls,
/// its finish; then the usage chunk when asked for.
fn split(body: &[u8], include_usage: bool) -> Option<Replayed> {
    let completion: Value = serde_json::from_slice(body).ok()?;
    let mut head = Map::new();
    for field in HEAD_FIELDS {
        if let Some(value) = completion.get(field).filter(|v| !v.is_null()) {
            head.insert(field.to_owned(), value.clone());
        }
    }
    head.insert("object".into(), json!("chat.completion.chunk"));
    let chunk = |choices: Value| {
        let mut chunk = head.clone();
        chunk.insert("choices".into(), choices);
        serde_json::to_vec(&Value::Object(chunk)).unwrap_or_default()
    };
    let mut out = Vec::with_capacity(body.len() * 2);
    for (position, choice) in completion["choices"].as_array()?.iter().enumerate() {
        let index = choice
            .get("index")
            .cloned()
            .unwrap_or_else(|| json!(position));
        let message = &choice["message"];
        let mut delta = Map::new();
        delta.insert(
            "role".into(),
            message
                .get("role")
                .cloned()
                .unwrap_or_else(|| json!("assistant")),
        );
        delta.insert(
            "content".into(),
            message.get("content").cloned().unwrap_or(Value::Null),
        );
        if let Some(refusal) = message.get("refusal").filter(|r| !r.is_null()) {
            delta.insert("refusal".into(), refusal.clone());
        }
        event(
            &mut out,
            &chunk(
                json!([{"index": index, "delta": delta, "logprobs": choice.get("logprobs").cloned().unwrap_or(Value::Null), "finish_reason": null}]),
            ),
        );
        if let Some(calls) = message["tool_calls"].as_array().filter(|c| !c.is_empty()) {
            let calls: Vec<Value> = calls
                .iter()
                .enumerate()
                .map(|(i, call)| {
                    let mut call = call.clone();
                    if let Some(object) = call.as_object_mut() {
                        object.insert("index".into(), json!(i));
                    }
                    call
                })
                .collect();
            event(
                &mut out,
                &chunk(
                    json!([{"index": index, "delta": {"tool_calls": calls}, "finish_reason": null}]),
                ),
            );
        }
        let finish = choice.get("finish_reason").cloned().unwrap_or(Value::Null);
        event(
            &mut out,
            &chunk(json!([{"index": index, "delta": {}, "finish_reason": finish}])),
        );
    }
    if include_usage && let Some(usage) = completion.get("usage").filter(|u| !u.is_null()) {
        let mut last = head.clone();
        last.insert("choices".into(), json!([]));
        last.insert("usage".into(), usage.clone());
        event(
            &mut out,
            &serde_json::to_vec(&Value::Object(last)).unwrap_or_default(),
        );
    }
    Some(done(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = concat!(
        "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":7,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":7,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":7,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":7,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
        "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":7,\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\n",
        "data: [DONE]\n\n",
    );

    fn stored(form: Form, body: &str) -> Entry {
        Entry {
            form,
            content_type: "application/json; charset=utf-8".into(),
            body: Bytes::from(body.to_owned()),
        }
    }

    fn payloads(replayed: &Replayed) -> Vec<Value> {
        sse_data(&replayed.body)
            .iter()
            .filter(|p| p.as_slice() != b"[DONE]")
            .map(|p| serde_json::from_slice(p).expect("JSON event"))
            .collect()
    }

    #[test]
    fn json_is_replayed_byte_for_byte_with_its_content_type() {
        let body = "{ \"choices\" : [ {\"finish_reason\":\"stop\"} ] }";
        let replayed = replay(&stored(Form::Json, body), false, false).expect("replayed");
        assert_eq!(replayed.body, body.as_bytes());
        assert_eq!(replayed.content_type, "application/json; charset=utf-8");
    }

    #[test]
    fn a_stream_is_replayed_ending_in_done_with_its_usage_chunk_only_when_asked() {
        let entry = stored(Form::Stream, STREAM);
        let without = replay(&entry, true, false).expect("replayed");
        assert_eq!(without.content_type, "text/event-stream");
        assert!(without.body.ends_with(b"data: [DONE]\n\n"));
        assert_eq!(payloads(&without).len(), 4);
        assert!(payloads(&without).iter().all(|c| c.get("usage").is_none()));
        let with = replay(&entry, true, true).expect("replayed");
        assert_eq!(payloads(&with).len(), 5);
        assert_eq!(payloads(&with)[4]["usage"]["total_tokens"], 7);
        assert_eq!(with.body.windows(6).filter(|w| w == b"[DONE]").count(), 1);
    }

    #[test]
    fn a_stream_asked_for_plain_is_assembled_into_one_completion() {
        let replayed = replay(&stored(Form::Stream, STREAM), false, false).expect("replayed");
        assert_eq!(replayed.content_type, "application/json");
        let completion: Value = serde_json::from_slice(&replayed.body).expect("JSON");
        assert_eq!(completion["object"], "chat.completion");
        assert_eq!(completion["id"], "c1");
        assert_eq!(completion["created"], 7);
        assert_eq!(completion["choices"][0]["message"]["content"], "Hello");
        assert_eq!(completion["choices"][0]["message"]["role"], "assistant");
        assert_eq!(completion["choices"][0]["finish_reason"], "stop");
        assert_eq!(completion["usage"]["total_tokens"], 7);
    }

    #[test]
    fn tool_calls_survive_both_ways() {
        let completion = json!({
            "id": "c2", "object": "chat.completion", "created": 9, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": null,
                "tool_calls": [{"id": "call_1", "type": "function",
                    "function": {"name": "lookup", "arguments": "{\"q\":\"x\"}"}}]},
                "finish_reason": "tool_calls"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
        });
        let entry = stored(Form::Json, &completion.to_string());
        let streamed = replay(&entry, true, true).expect("split");
        let chunks = payloads(&streamed);
        assert_eq!(chunks.len(), 4, "role, tool calls, finish, usage");
        assert!(
            chunks
                .iter()
                .all(|c| c["object"] == "chat.completion.chunk")
        );
        assert_eq!(
            chunks[1]["choices"][0]["delta"]["tool_calls"][0]["index"],
            0
        );
        assert_eq!(chunks[2]["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(chunks[3]["usage"]["total_tokens"], 7);
        assert_eq!(
            payloads(&replay(&entry, true, false).expect("split")).len(),
            3
        );

        // And back: the split stream assembles into the same message.
        let again = stored(
            Form::Stream,
            std::str::from_utf8(&streamed.body).expect("utf-8"),
        );
        let assembled = replay(&again, false, false).expect("assembled");
        let assembled: Value = serde_json::from_slice(&assembled.body).expect("JSON");
        assert_eq!(
            assembled["choices"],
            completion["choices"].clone().tap_logprobs()
        );
        assert_eq!(assembled["usage"], completion["usage"]);
    }

    #[test]
    fn split_tool_call_arguments_are_joined() {
        let stream = concat!(
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"tool_calls\":[{\"index\":0,\"id\":\"call_1\",\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"\"}}]},\"finish_reason\":null}]}\n\n",
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"a\\\":\"}}]},\"finish_reason\":null}]}\n\n",
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"1}\"}}]},\"finish_reason\":\"tool_calls\"}]}\n\n",
        );
        let assembled = replay(&stored(Form::Stream, stream), false, false).expect("assembled");
        let assembled: Value = serde_json::from_slice(&assembled.body).expect("JSON");
        let call = &assembled["choices"][0]["message"]["tool_calls"][0];
        assert_eq!(call["id"], "call_1");
        assert_eq!(call["function"]["name"], "f");
        assert_eq!(call["function"]["arguments"], "{\"a\":1}");
        assert_eq!(assembled["choices"][0]["message"]["content"], Value::Null);
    }

    #[test]
    fn an_entry_that_does_not_read_as_its_form_is_not_replayed() {
        assert_eq!(replay(&stored(Form::Json, "<html>"), true, false), None);
        assert_eq!(
            replay(&stored(Form::Stream, "data: <html>\n\n"), false, false),
            None
        );
    }

    /// The choices as an assembly gives them back: `logprobs` present.
    trait TapLogprobs {
        fn tap_logprobs(self) -> Value;
    }

    impl TapLogprobs for Value {
        fn tap_logprobs(mut self) -> Value {
            for choice in self.as_array_mut().into_iter().flatten() {
                choice["logprobs"] = Value::Null;
            }
            self
        }
    }
}
