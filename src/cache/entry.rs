//! What the cache keeps of an answer ([`Entry`]), whether an answer may be
//! kept at all ([`Entry::admit`], a pure function of its bytes), and the
//! bytes an entry is stored as where it leaves the process (Redis).
//!
//! Kept: an upstream's 200 that ended complete (the relay decides that),
//! whose every choice finished for a reason other than `length` (a reply or
//! a tool call cut short by its token cap is not an answer worth serving
//! again), or an embeddings list with at least one vector, with no error in
//! it. A stream is kept as its events as the
//! upstream sent them, its usage chunk included when there was one, so a
//! later request that asks for the usage chunk gets it.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

/// How an answer was sent, and so how it is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// One `chat.completion` JSON body.
    Json,
    /// Server-sent events of `chat.completion.chunk`s.
    Stream,
}

/// One cached answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub form: Form,
    /// The upstream's `Content-Type`, replayed with a JSON body.
    pub content_type: String,
    /// The body as the upstream sent it.
    pub body: Bytes,
}

/// Why an answer is not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotKept {
    #[error("not a chat completion")]
    NotAnAnswer,
    #[error("it reports an error")]
    Error,
    #[error("a choice did not finish")]
    Unfinished,
    #[error("a choice was cut short by its length")]
    CutShort,
}

/// The fields of a completion (or a chunk, or an embeddings list) that
/// decide whether it is kept.
#[derive(Deserialize)]
struct View<'a> {
    #[serde(default, borrow)]
    choices: Option<Vec<ChoiceView<'a>>>,
    #[serde(default, borrow)]
    error: Option<&'a RawValue>,
    /// An embeddings answer's vectors (never parsed: only whether there
    /// are any).
    #[serde(default, borrow)]
    data: Option<Vec<&'a RawValue>>,
}

#[derive(Deserialize)]
struct ChoiceView<'a> {
    #[serde(default)]
    index: Option<u64>,
    #[serde(default, borrow)]
    finish_reason: Option<&'a RawValue>,
}

/// A choice's `finish_reason`, where it has one (`null` is none).
fn finish_reason<'a>(choice: &ChoiceView<'a>) -> Option<&'a str> {
    choice
        .finish_reason
        .map(RawValue::get)
        .filter(|raw| *raw != "null")
}

/// Whether a finish reason ends an answer worth keeping.
fn check_finish(reason: Option<&str>) -> Result<(), NotKept> {
    match reason {
        None => Err(NotKept::Unfinished),
        Some("\"length\"") => Err(NotKept::CutShort),
        Some(_) => Ok(()),
    }
}

/// The `data:` payloads of an event stream, in order (multi-line data
/// joined by `\n`, as SSE defines it); other fields and comments skipped.
pub fn sse_data(body: &[u8]) -> Vec<Vec<u8>> {
    let mut events = Vec::new();
    let mut data: Option<Vec<u8>> = None;
    for line in body.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            if let Some(payload) = data.take() {
                events.push(payload);
            }
            continue;
        }
        let Some(value) = line.strip_prefix(b"data:") else {
            continue;
        };
        let value = value.strip_prefix(b" ").unwrap_or(value);
        match &mut data {
            Some(payload) => {
                payload.push(b'\n');
                payload.extend_from_slice(value);
            }
            None => data = Some(value.to_vec()),
        }
    }
    if let Some(payload) = data {
        events.push(payload);
    }
    events
}

impl Entry {
    /// The entry for an upstream's complete 200 `body`, sent as `form`
    /// with `content_type`, or why it is not kept.
    pub fn admit(form: Form, content_type: &str, body: Bytes) -> Result<Self, NotKept> {
        match form {
            Form::Json => check_json(&body)?,
            Form::Stream => check_stream(&body)?,
        }
        Ok(Self {
            form,
            content_type: content_type.to_owned(),
            body,
        })
    }

    /// What the entry weighs in the memory backend: its bytes.
    pub fn weight(&self) -> usize {
        self.body.len() + self.content_type.len()
    }

    /// The entry as stored outside the process: a version and form tag,
    /// the content type's length (2 bytes) and text, then the body.
    pub fn encode(&self) -> Vec<u8> {
        let content_type = self.content_type.as_bytes();
        let length = u16::try_from(content_type.len()).unwrap_or(0);
        let content_type = &content_type[..usize::from(length)];
        let mut out = Vec::with_capacity(4 + content_type.len() + self.body.len());
        out.push(b'1');
        out.push(match self.form {
            Form::Json => b'J',
            Form::Stream => b'S',
        });
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(content_type);
        out.extend_from_slice(&self.body);
        out
    }

    /// [`Entry::encode`]'s bytes read back; `None` for anything else (an
    /// older layout, a foreign value under the key).
    pub fn decode(bytes: Bytes) -> Option<Self> {
        let (&[version, form, a, b], _) = bytes.split_first_chunk::<4>()?;
        let form = match (version, form) {
            (b'1', b'J') => Form::Json,
            (b'1', b'S') => Form::Stream,
            _ => return None,
        };
        let length = usize::from(u16::from_be_bytes([a, b]));
        let content_type = bytes.get(4..4 + length)?;
        let content_type = std::str::from_utf8(content_type).ok()?.to_owned();
        Some(Self {
            form,
            content_type,
            body: bytes.slice(4 + length..),
        })
    }
}

fn check_json(body: &[u8]) -> Result<(), NotKept> {
    let view: View<'_> = serde_json::from_slice(body).map_err(|_| NotKept::NotAnAnswer)?;
    if view.error.is_some_and(|e| e.get() != "null") {
        return Err(NotKept::Error);
    }
    let Some(choices) = view.choices.filter(|c| !c.is_empty()) else {
        // An embeddings list: kept when it holds a vector.
        return match view.data {
            Some(data) if !data.is_empty() => Ok(()),
            _ => Err(NotKept::NotAnAnswer),
        };
    };
    choices
        .iter()
        .try_for_each(|choice| check_finish(finish_reason(choice)))
}

fn check_stream(body: &[u8]) -> Result<(), NotKept> {
    // Each choice index seen, with the reason it finished (if it did).
    let mut finished: Vec<(u64, Option<String>)> = Vec::new();
    for payload in sse_data(body) {
        if payload.trim_ascii() == b"[DONE]" {
            continue;
        }
        let view: View<'_> = serde_json::from_slice(&payload).map_err(|_| NotKept::NotAnAnswer)?;
        if view.error.is_some_and(|e| e.get() != "null") {
            return Err(NotKept::Error);
        }
        for choice in view.choices.iter().flatten() {
            let index = choice.index.unwrap_or(0);
            let reason = finish_reason(choice).map(str::to_owned);
            match finished.iter_mut().find(|(i, _)| *i == index) {
                Some((_, seen)) => {
                    if reason.is_some() {
                        *seen = reason;
                    }
                }
                None => finished.push((index, reason)),
            }
        }
    }
    if finished.is_empty() {
        return Err(NotKept::NotAnAnswer);
    }
    finished
        .iter()
        .try_for_each(|(_, reason)| check_finish(reason.as_deref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(body: &str) -> Result<Entry, NotKept> {
        Entry::admit(Form::Json, "application/json", Bytes::from(body.to_owned()))
    }

    fn stream(body: &str) -> Result<Entry, NotKept> {
        Entry::admit(
            Form::Stream,
            "text/event-stream",
            Bytes::from(body.to_owned()),
        )
    }

    #[test]
    fn a_finished_answer_is_kept_and_one_cut_short_or_in_error_is_not() {
        let ok = r#"{"choices":[{"index":0,"message":{"content":"hi"},"finish_reason":"stop"}]}"#;
        assert!(json(ok).is_ok());
        let tools = r#"{"choices":[{"message":{"tool_calls":[]},"finish_reason":"tool_calls"}]}"#;
        assert!(json(tools).is_ok());
        let length = r#"{"choices":[{"index":0,"message":{"content":"h"},"finish_reason":"stop"},
                         {"index":1,"message":{"tool_calls":[]},"finish_reason":"length"}]}"#;
        assert_eq!(json(length), Err(NotKept::CutShort));
        let open = r#"{"choices":[{"index":0,"message":{"content":"hi"},"finish_reason":null}]}"#;
        assert_eq!(json(open), Err(NotKept::Unfinished));
        assert_eq!(json(r#"{"error":{"message":"no"}}"#), Err(NotKept::Error));
        assert_eq!(
            json(r#"{"choices":[{"finish_reason":"stop"}],"error":{"code":"x"}}"#),
            Err(NotKept::Error)
        );
        assert_eq!(json(r#"{"choices":[]}"#), Err(NotKept::NotAnAnswer));
        assert_eq!(json("<html>"), Err(NotKept::NotAnAnswer));
        // Embeddings: a list with vectors is an answer, an empty one is not.
        let vectors = r#"{"object":"list","data":[{"embedding":"AAAA","index":0}],"usage":{}}"#;
        assert!(json(vectors).is_ok());
        assert_eq!(
            json(r#"{"object":"list","data":[]}"#),
            Err(NotKept::NotAnAnswer)
        );
        assert_eq!(
            json(r#"{"choices":[{"finish_reason":"stop"}"#),
            Err(NotKept::NotAnAnswer)
        );
    }

    #[test]
    fn a_stream_is_kept_when_every_choice_finished_well() {
        let chunk = |index: u32, finish: &str| {
            format!(
                "data: {{\"choices\":[{{\"index\":{index},\"delta\":{{\"content\":\"x\"}},\"finish_reason\":{finish}}}]}}\n\n"
            )
        };
        let usage = "data: {\"choices\":[],\"usage\":{\"total_tokens\":3}}\n\n";
        let done = "data: [DONE]\n\n";
        let whole = [
            chunk(0, "null"),
            chunk(0, "\"stop\""),
            usage.into(),
            done.into(),
        ]
        .concat();
        assert!(stream(&whole).is_ok());
        // Two choices: both must finish, neither by length.
        let two = [
            chunk(0, "null"),
            chunk(1, "null"),
            chunk(0, "\"stop\""),
            done.into(),
        ]
        .concat();
        assert_eq!(stream(&two), Err(NotKept::Unfinished));
        let cut = [chunk(0, "null"), chunk(0, "\"length\""), done.into()].concat();
        assert_eq!(stream(&cut), Err(NotKept::CutShort));
        let error = [
            chunk(0, "null"),
            "data: {\"error\":{\"code\":\"upstream_stream_interrupted\"}}\n\n".into(),
        ]
        .concat();
        assert_eq!(stream(&error), Err(NotKept::Error));
        assert_eq!(stream(done), Err(NotKept::NotAnAnswer));
        // CRLF line ends and comments are read too.
        let crlf = format!(
            ": keep-alive\r\n\r\n{}",
            chunk(0, "\"stop\"").replace('\n', "\r\n")
        );
        assert!(stream(&crlf).is_ok());
    }

    #[test]
    fn entries_are_read_back_from_their_encoding_and_nothing_else_is() {
        let entry = Entry {
            form: Form::Stream,
            content_type: "text/event-stream; charset=utf-8".into(),
            body: Bytes::from_static(b"data: {}\n\n"),
        };
        let encoded = Bytes::from(entry.encode());
        assert_eq!(Entry::decode(encoded.clone()), Some(entry));
        assert_eq!(Entry::decode(encoded.slice(..3)), None);
        assert_eq!(Entry::decode(encoded.slice(..8)), None);
        assert_eq!(Entry::decode(Bytes::from_static(b"2J\0\0{}")), None);
        assert_eq!(
            Entry::decode(Bytes::from_static(b"1J\0\0{}")).map(|e| e.body),
            Some(Bytes::from_static(b"{}"))
        );
    }
}
