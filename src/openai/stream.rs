//! Watching a chat completion response go by: the `usage` it reports (or the
//! text it generated, when it reports none), and removing the usage-only SSE
//! event that Iris asked for on the client's behalf.
//!
//! Chunks reach the client as they arrive. Only when an event may have to be
//! removed is an incomplete event held back until its end (one event is one
//! upstream write in practice, so this adds no delay).

use std::borrow::Cow;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

/// Token counts as the upstream reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
    /// `cached_tokens`: prompt tokens the provider served from its cache.
    #[serde(default, deserialize_with = "lenient")]
    pub prompt_tokens_details: Option<TokenDetails>,
    /// `reasoning_tokens`: completion tokens spent reasoning.
    #[serde(default, deserialize_with = "lenient")]
    pub completion_tokens_details: Option<TokenDetails>,
}

/// The breakdowns inside `usage` that pricing reads; other fields ignored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct TokenDetails {
    #[serde(default, deserialize_with = "lenient")]
    pub cached_tokens: Option<u64>,
    #[serde(default, deserialize_with = "lenient")]
    pub reasoning_tokens: Option<u64>,
}

/// A breakdown that is `null`, or not the shape expected, reads as absent:
/// providers vary here, and the counts that bill are the required ones.
///
/// Read as the text it was sent as, then as `T`: a `serde_json::Value`
/// would allocate a map and its keys for every response that reports them.
fn lenient<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    let raw: Option<&'de RawValue> = Option::deserialize(deserializer)?;
    Ok(raw.and_then(|raw| serde_json::from_str(raw.get()).ok()))
}

impl Usage {
    /// Prompt tokens served from the provider's cache (0 when not reported).
    pub fn cached_tokens(&self) -> u64 {
        self.prompt_tokens_details
            .and_then(|d| d.cached_tokens)
            .unwrap_or(0)
    }

    /// Completion tokens spent reasoning (0 when not reported).
    pub fn reasoning_tokens(&self) -> u64 {
        self.completion_tokens_details
            .and_then(|d| d.reasoning_tokens)
            .unwrap_or(0)
    }

    /// `total_tokens`, or the sum where an upstream leaves it out.
    pub fn total(&self) -> u64 {
        self.total_tokens
            .max(self.prompt_tokens + self.completion_tokens)
    }
}

/// How a relayed response ended, for accounting.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The body reached its end (false: the client hung up, or the upstream failed).
    pub complete: bool,
    pub usage: Option<Usage>,
    /// The generated text seen so far, for an estimate where no usage came
    /// (a plain body's is read only then).
    pub generated: String,
    /// A stream said it was done (`[DONE]`, or a `finish_reason`); a stream
    /// that ends without either was cut short.
    pub finished: bool,
    /// A plain body's `error.code` (else its `error.type`), as an upstream
    /// error reports it: short, printable, or left out.
    pub error_code: Option<String>,
}

/// An event larger than this is not held back to be edited: the body is
/// passed through as it comes.
const MAX_PENDING_EVENT: usize = 1024 * 1024;

/// A response body larger than this is not kept whole: only its last
/// [`KEPT_TAIL`] bytes, where OpenAI's shape puts the `usage`.
const MAX_KEPT_BODY: usize = 8 * 1024 * 1024;

/// How much of the end of a body too large to keep is kept.
const KEPT_TAIL: usize = 64 * 1024;

pub struct UsageTap {
    streaming: bool,
    drop_usage_chunk: bool,
    /// Streaming: the incomplete tail event. Otherwise: the body so far
    /// (or its last bytes, once `cut` is set), from its second chunk on.
    pending: Vec<u8>,
    /// A plain body's first chunk, kept as it came: a body of one chunk
    /// (most answers) is read where it is, never copied.
    whole: Option<Bytes>,
    /// A plain body grew over [`MAX_KEPT_BODY`]: `pending` holds its tail.
    cut: bool,
    outcome: Outcome,
}

impl UsageTap {
    /// Whether the body is read as server-sent events, event by event.
    pub fn reads_events(&self) -> bool {
        self.streaming
    }

    /// Whether the stream has said it is done (`[DONE]` or a
    /// `finish_reason`), counting an event still held back.
    pub fn said_done(&self) -> bool {
        self.outcome.finished || self.pending.windows(6).any(|w| w == b"[DONE]")
    }

    /// `streaming`: the body is SSE. `drop_usage_chunk`: remove the usage-only
    /// event, which the client did not ask for.
    pub fn new(streaming: bool, drop_usage_chunk: bool) -> Self {
        Self {
            streaming,
            drop_usage_chunk: streaming && drop_usage_chunk,
            pending: Vec::new(),
            whole: None,
            cut: false,
            outcome: Outcome::default(),
        }
    }

    /// Splits complete events off `pending`, noting each; returns the bytes to send.
    fn drain_events(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(end) = find_event_end(&self.pending[start..]) {
            let event = &self.pending[start..start + end];
            let usage_only = note_event(event, &mut self.outcome);
            if !(self.drop_usage_chunk && usage_only) {
                out.extend_from_slice(event);
            }
            start += end;
        }
        self.pending.drain(..start);
        out
    }
}

impl UsageTap {
    /// Notes a chunk on its way to the client; returns what to send of it
    /// (the chunk, or less when the usage event is held back or removed).
    pub fn on_chunk(&mut self, chunk: Bytes) -> Bytes {
        if !self.streaming {
            if let Some(first) = self.whole.take() {
                self.pending.extend_from_slice(&first);
            } else if self.pending.is_empty() && !self.cut {
                self.whole = Some(chunk.clone());
                return chunk;
            }
            self.pending.extend_from_slice(&chunk);
            if self.pending.len() > MAX_KEPT_BODY {
                self.cut = true;
            }
            if self.cut && self.pending.len() > 2 * KEPT_TAIL {
                self.pending.drain(..self.pending.len() - KEPT_TAIL);
            }
            return chunk;
        }
        self.pending.extend_from_slice(&chunk);
        let ready = self.drain_events();
        if self.pending.len() > MAX_PENDING_EVENT {
            // No event boundary in sight: this is not an event stream Iris
            // can edit. Stop holding anything back and stop looking (and
            // judging whether it ended as it should).
            self.streaming = false;
            self.outcome.finished = true;
            let held = std::mem::take(&mut self.pending);
            if self.drop_usage_chunk {
                self.drop_usage_chunk = false;
                let mut out = ready;
                out.extend_from_slice(&held);
                return Bytes::from(out);
            }
            return chunk;
        }
        if self.drop_usage_chunk {
            Bytes::from(ready)
        } else {
            chunk
        }
    }

    /// The body ended, reaching its end (`complete`) or not (the upstream
    /// failed, the client went away): the bytes still to send, if any, and
    /// how the response went.
    pub fn finish(&mut self, complete: bool) -> (Option<Bytes>, Outcome) {
        let mut unsent = None;
        if self.streaming {
            // An unterminated last event still counts, and still goes to
            // the client if it was held back (unless it is the usage chunk
            // Iris removes).
            let tail = std::mem::take(&mut self.pending);
            let usage_only = note_event(&tail, &mut self.outcome);
            if self.drop_usage_chunk && !usage_only && !tail.is_empty() {
                unsent = Some(Bytes::from(tail));
            }
        } else if self.cut {
            self.outcome.usage = usage_in_tail(&self.pending);
        } else {
            let whole = self.whole.take();
            note_body(whole.as_deref().unwrap_or(&self.pending), &mut self.outcome);
        }
        self.outcome.complete = complete;
        (unsent, std::mem::take(&mut self.outcome))
    }
}

/// The length of the first complete event in `buf`, its blank line included.
fn find_event_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i + 1 < buf.len() {
        if buf[i] == b'\n' {
            if buf[i + 1] == b'\n' {
                return Some(i + 2);
            }
            if buf[i + 1] == b'\r' && buf.get(i + 2) == Some(&b'\n') {
                return Some(i + 3);
            }
        }
        i += 1;
    }
    None
}

/// A streamed chunk ([`BodyView`] is a whole body): read only from a JSON
/// object, as serde would otherwise read a struct from an array too (see
/// [`is_object`]).
#[derive(Deserialize)]
struct ChunkView<'a> {
    #[serde(default, deserialize_with = "usage_object")]
    usage: Option<Usage>,
    #[serde(default, borrow)]
    choices: Option<Vec<ChoiceView<'a>>>,
}

/// OpenAI's error object, as far as the spend log names it.
#[derive(Deserialize)]
struct ErrorView<'a> {
    #[serde(default, borrow)]
    code: Option<&'a RawValue>,
    #[serde(default, borrow, rename = "type")]
    kind: Option<&'a RawValue>,
}

impl ErrorView<'_> {
    /// `code`, else `type`: a string (or a number) of at most 64 printable
    /// ASCII characters.
    fn code(&self) -> Option<String> {
        let name = |raw: Option<&RawValue>| {
            let raw = raw?.get();
            let text = serde_json::from_str::<String>(raw).unwrap_or_else(|_| raw.to_owned());
            (!text.is_empty()
                && text.len() <= 64
                && text.bytes().all(|b| b.is_ascii_graphic())
                && text != "null")
                .then_some(text)
        };
        name(self.code).or_else(|| name(self.kind))
    }
}

#[derive(Deserialize)]
struct ChoiceView<'a> {
    #[serde(default, borrow)]
    finish_reason: Option<&'a RawValue>,
    #[serde(default, borrow)]
    delta: Option<MessageView<'a>>,
    #[serde(default, borrow)]
    message: Option<MessageView<'a>>,
}

#[derive(Deserialize)]
struct MessageView<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    tool_calls: Option<&'a RawValue>,
}

/// Notes one SSE event; true if it carries usage and no choices.
fn note_event(event: &[u8], outcome: &mut Outcome) -> bool {
    let mut usage_only = false;
    for line in event.split(|&b| b == b'\n') {
        let Some(data) = line.strip_prefix(b"data:") else {
            continue;
        };
        let data = data.trim_ascii();
        if data == b"[DONE]" {
            outcome.finished = true;
            continue;
        }
        if !is_object(data) {
            continue;
        }
        let data = json_text(data);
        let Ok(chunk) = serde_json::from_str::<ChunkView<'_>>(&data) else {
            continue;
        };
        let no_choices = chunk.choices.as_ref().is_none_or(Vec::is_empty);
        if let Some(usage) = chunk.usage {
            outcome.usage = Some(usage);
            usage_only = no_choices;
        }
        for choice in chunk.choices.iter().flatten() {
            note_message(choice.delta.as_ref(), outcome);
            if choice
                .finish_reason
                .is_some_and(|reason| reason.get() != "null")
            {
                outcome.finished = true;
            }
        }
    }
    usage_only
}

/// A whole (non-streamed) response body: its choices are kept as their
/// text, and read only when no usage came (the generated text is then
/// what is counted).
#[derive(Deserialize)]
struct BodyView<'a> {
    #[serde(default, deserialize_with = "usage_object")]
    usage: Option<Usage>,
    #[serde(default, borrow)]
    choices: Option<&'a RawValue>,
    #[serde(default, borrow)]
    error: Option<ErrorView<'a>>,
}

/// Notes a whole (non-streamed) response body.
fn note_body(body: &[u8], outcome: &mut Outcome) {
    if !is_object(body.trim_ascii()) {
        return;
    }
    let body = json_text(body);
    let Ok(view) = serde_json::from_str::<BodyView<'_>>(&body) else {
        return;
    };
    outcome.usage = view.usage;
    outcome.error_code = view.error.as_ref().and_then(ErrorView::code);
    if outcome.usage.is_some() {
        return;
    }
    let choices = view
        .choices
        .and_then(|raw| serde_json::from_str::<Vec<ChoiceView<'_>>>(raw.get()).ok());
    for choice in choices.iter().flatten() {
        note_message(choice.message.as_ref(), outcome);
    }
}

/// The last `"usage": {...}` member in the tail of a body too large to keep
/// (not one inside a string: its quotes would be escaped).
fn usage_in_tail(tail: &[u8]) -> Option<Usage> {
    const KEY: &[u8] = b"\"usage\"";
    let mut end = tail.len();
    while let Some(at) = tail[..end].windows(KEY.len()).rposition(|w| w == KEY) {
        end = at;
        if at > 0 && tail[at - 1] == b'\\' {
            continue;
        }
        let rest = tail[at + KEY.len()..].trim_ascii_start();
        let Some(value) = rest.strip_prefix(b":") else {
            continue;
        };
        let value = value.trim_ascii_start();
        if !is_object(value) {
            continue;
        }
        if let Some(Ok(usage)) = serde_json::Deserializer::from_slice(value)
            .into_iter::<Usage>()
            .next()
        {
            return Some(usage);
        }
    }
    None
}

/// An upstream's JSON as text: checked as UTF-8 once (serde_json reading
/// bytes checks each string it reads, a call each), and a stray byte that
/// is not UTF-8 read as U+FFFD, so that it does not make the whole body
/// unreadable and lose the usage that bills. Only what Iris reads from the
/// body is made of it; the client gets the body as it came.
fn json_text(json: &[u8]) -> Cow<'_, str> {
    // `from_utf8_lossy` alone checks a valid text piece by piece: 2k
    // instructions for a small answer against 250 for this.
    match std::str::from_utf8(json) {
        Ok(text) => Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(json),
    }
}

/// Whether trimmed JSON text is an object: serde reads a struct from an
/// array of its fields in order, so `[[]]` would pass for a chunk whose
/// usage is zero tokens.
fn is_object(json: &[u8]) -> bool {
    json.first() == Some(&b'{')
}

/// `usage`: an object or null; anything else makes the chunk unreadable.
/// Read in the same pass as the chunk, not kept as text and read again.
fn usage_object<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Usage>, D::Error> {
    struct ObjectOrNull;

    impl<'de> serde::de::Visitor<'de> for ObjectOrNull {
        type Value = Option<Usage>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a usage object or null")
        }

        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: serde::Deserializer<'de>>(
            self,
            inner: D,
        ) -> Result<Self::Value, D::Error> {
            inner.deserialize_any(self)
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            Usage::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Some)
        }
    }

    deserializer.deserialize_option(ObjectOrNull)
}

fn note_message(message: Option<&MessageView<'_>>, outcome: &mut Outcome) {
    let Some(message) = message else { return };
    if let Some(content) = &message.content {
        outcome.generated.push_str(content);
    }
    if let Some(tool_calls) = message.tool_calls {
        outcome.generated.push_str(tool_calls.get());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(
        streaming: bool,
        drop_usage: bool,
        chunks: &[&str],
        complete: bool,
    ) -> (String, Outcome) {
        let mut tap = UsageTap::new(streaming, drop_usage);
        let mut out = String::new();
        for chunk in chunks {
            let bytes = tap.on_chunk(Bytes::copy_from_slice(chunk.as_bytes()));
            out.push_str(std::str::from_utf8(&bytes).expect("utf8"));
        }
        let (tail, outcome) = tap.finish(complete);
        if let Some(tail) = tail {
            out.push_str(std::str::from_utf8(&tail).expect("utf8"));
        }
        (out, outcome)
    }

    const EVENTS: [&str; 4] = [
        "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n",
        "data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}],\"usage\":null}\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\n",
        "data: [DONE]\n\n",
    ];

    #[test]
    fn usage_chunk_is_read_and_removed_when_iris_asked_for_it() {
        let (out, outcome) = run(true, true, &EVENTS, true);
        assert_eq!(out, [EVENTS[0], EVENTS[1], EVENTS[3]].concat());
        assert_eq!(outcome.usage.map(|u| u.total()), Some(7));
        assert_eq!(outcome.generated, "Hello");
        assert!(outcome.complete);
    }

    #[test]
    fn usage_chunk_stays_when_the_client_asked_for_it() {
        let (out, outcome) = run(true, false, &EVENTS, true);
        assert_eq!(out, EVENTS.concat());
        assert_eq!(outcome.usage.map(|u| u.total()), Some(7));
    }

    #[test]
    fn events_split_across_chunks_are_reassembled() {
        let all = EVENTS.concat();
        let pieces: Vec<&str> = all
            .as_bytes()
            .chunks(7)
            .map(|c| std::str::from_utf8(c).expect("ascii"))
            .collect();
        let (out, outcome) = run(true, true, &pieces, true);
        assert_eq!(out, [EVENTS[0], EVENTS[1], EVENTS[3]].concat());
        assert_eq!(outcome.usage.map(|u| u.total()), Some(7));
    }

    #[test]
    fn an_unterminated_last_event_still_reaches_the_client() {
        let chunks = [EVENTS[0], EVENTS[2], "data: [DONE]\n"];
        let (out, outcome) = run(true, true, &chunks, true);
        assert_eq!(out, [EVENTS[0], "data: [DONE]\n"].concat());
        assert_eq!(outcome.usage.map(|u| u.total()), Some(7));
    }

    #[test]
    fn a_body_without_event_boundaries_is_passed_through() {
        let big = "x".repeat(MAX_PENDING_EVENT + 10);
        let (out, _) = run(true, true, &["data: {", &big, "}"], true);
        assert_eq!(out.len(), "data: {}".len() + big.len());
    }

    #[test]
    fn a_body_too_large_to_keep_is_charged_the_usage_at_its_end() {
        let filler = "a".repeat(1 << 20);
        let mut chunks = vec![
            "{\"choices\":[{\"message\":{\"content\":\"say \\\"usage\\\": {\\\"total_tokens\\\": 1} ",
        ];
        chunks.extend(std::iter::repeat_n(filler.as_str(), 9));
        chunks.push("\"}}],\"usage\": {\"prompt_tokens\":3,\"completion_tokens\":2359296,\"total_tokens\":2359299}}");
        let (out, outcome) = run(false, false, &chunks, true);
        assert_eq!(out.len(), chunks.iter().map(|c| c.len()).sum::<usize>());
        assert_eq!(outcome.usage.map(|u| u.total()), Some(2_359_299));

        // Inside a string, the last: not a usage.
        let (_, outcome) = run(
            false,
            false,
            &[
                &chunks[..10].concat(),
                "\\\"usage\\\": {\\\"total_tokens\\\": 1}\"}}]}",
            ],
            true,
        );
        assert_eq!(outcome.usage, None);
    }

    /// A plain body's text is read when no usage came, and only then.
    #[test]
    fn plain_body_usage_or_text() {
        let body = r#"{"choices":[{"message":{"content":"Hi there"}}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#;
        // Whole, in two chunks, and in several after an empty one.
        for chunks in [
            &[body][..],
            &[&body[..10], &body[10..]][..],
            &["", &body[..10], "", &body[10..40], &body[40..]][..],
        ] {
            let (out, outcome) = run(false, false, chunks, true);
            assert_eq!(out, body);
            assert_eq!(outcome.usage.map(|u| u.total()), Some(5), "{chunks:?}");
            assert_eq!(outcome.generated, "");
        }

        let unreported =
            r#"{"choices":[{"message":{"content":"Hi \u0074here","tool_calls":[{"id":"c"}]}}]}"#;
        let (_, outcome) = run(false, false, &[unreported], true);
        assert_eq!(outcome.usage, None);
        assert_eq!(outcome.generated, r#"Hi there[{"id":"c"}]"#);
    }

    /// Choices of a shape Iris does not read (content as parts, say) do not
    /// hide the usage beside them; `null` is no usage; a usage that is not
    /// an object leaves the body unread; details of another shape read as
    /// absent.
    #[test]
    fn a_plain_bodys_usage_is_read_whatever_its_choices() {
        let parts = r#"{"choices":[{"message":{"content":[{"type":"text","text":"Hi"}]}}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5,"prompt_tokens_details":{"cached_tokens":1,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":"many"}}}"#;
        let usage = run(false, false, &[parts], true).1.usage.expect("usage");
        assert_eq!(
            (
                usage.total(),
                usage.cached_tokens(),
                usage.reasoning_tokens()
            ),
            (5, 1, 0)
        );
        let null = r#"{"choices":[{"message":{"content":"Hi"}}],"usage":null}"#;
        let outcome = run(false, false, &[null], true).1;
        assert_eq!((outcome.usage, outcome.generated.as_str()), (None, "Hi"));
        let number = r#"{"choices":[{"message":{"content":"Hi"}}],"usage":7}"#;
        let outcome = run(false, false, &[number], true).1;
        assert_eq!((outcome.usage, outcome.generated.as_str()), (None, ""));
    }

    /// Found by the `sse_usage` fuzz target: serde reads a struct from a
    /// JSON array too, so `data: [[]]` passed for a usage-only chunk (zero
    /// tokens) and was removed from the stream, and a body `[[]]` settled
    /// as zero tokens. Chunks and their usage are objects, or not chunks.
    #[test]
    fn arrays_are_neither_chunks_nor_usage() {
        for event in [
            "data:[[]]\n\n",
            "data: [[1,2,3]]\n\n",
            "data: {\"choices\":[],\"usage\":[5,2,7]}\n\n",
        ] {
            let (out, outcome) = run(true, true, &[event], true);
            assert_eq!(out, event, "{event:?} is passed on");
            assert_eq!(outcome.usage, None, "{event:?} reports no usage");
        }
        let (_, outcome) = run(false, false, &["[[3,4,7]]"], true);
        assert_eq!(outcome.usage, None, "an array body reports no usage");
    }

    #[test]
    fn an_error_body_names_its_code() {
        let body = r#"{"error":{"message":"no","type":"server_error","code":"mock_error"}}"#;
        assert_eq!(
            run(false, false, &[body], true).1.error_code.as_deref(),
            Some("mock_error")
        );
        let typed = r#"{"error":{"message":"no","type":"rate_limit","code":null}}"#;
        assert_eq!(
            run(false, false, &[typed], true).1.error_code.as_deref(),
            Some("rate_limit")
        );
        let numbered = r#"{"error":{"message":"no","code":429}}"#;
        assert_eq!(
            run(false, false, &[numbered], true).1.error_code.as_deref(),
            Some("429")
        );
        let odd = r#"{"error":{"code":"has spaces in it"}}"#;
        assert_eq!(run(false, false, &[odd], true).1.error_code, None);
    }

    /// A body that is not UTF-8 is read through a lossy view: a stray byte
    /// in an upstream's text does not cost the usage that bills, and the
    /// client still gets the bytes as they came.
    #[test]
    fn usage_is_read_from_a_body_that_is_not_utf8() {
        let usage = br#""usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}"#;
        let body = [
            &b"{\"choices\":[{\"message\":{\"content\":\"H\xffi\"}}],"[..],
            usage,
            b"}",
        ]
        .concat();
        let event = [
            &b"data: {\"choices\":[{\"delta\":{\"content\":\"\xfe\"}}],"[..],
            usage,
            b"}\n\n",
        ]
        .concat();
        for (streaming, text) in [(false, body), (true, event)] {
            let mut tap = UsageTap::new(streaming, false);
            let passed = tap.on_chunk(Bytes::from(text.clone()));
            let (tail, outcome) = tap.finish(true);
            let out = [&passed[..], tail.as_deref().unwrap_or_default()].concat();
            assert_eq!(out, text, "passed on as it came");
            assert_eq!(
                outcome.usage.map(|u| u.total()),
                Some(7),
                "streaming: {streaming}"
            );
        }
    }

    #[test]
    fn a_hang_up_reports_what_was_generated() {
        let (_, outcome) = run(true, true, &EVENTS[..1], false);
        assert!(!outcome.complete);
        assert_eq!(outcome.usage, None);
        assert_eq!(outcome.generated, "Hel");
    }
}
