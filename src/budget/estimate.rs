//! What a request may cost, before it is sent: prompt tokens counted with a
//! real tokenizer (o200k_base), image tokens from each image's dimensions,
//! and the completion cap. The reservation is this estimate; settlement
//! replaces it by what the upstream reports.
//!
//! # Images
//!
//! Images are counted with OpenAI's published tile formula, whatever the
//! upstream, because the estimate only has to be a fair upper bound until
//! settlement replaces it by the upstream's own count:
//!
//! - `detail: "low"`: a flat [`LOW_DETAIL_TOKENS`] (85).
//! - otherwise (`"high"`, `"auto"`, or none): the image is scaled down to fit
//!   in 2048×2048, then down so its shortest side is at most 768 px; it costs
//!   85 + 170 per 512 px tile (`ceil(w/512) * ceil(h/512)` tiles). A 1024×1024
//!   image is 765 tokens.
//! - The dimensions of a `data:` URI image are read from its header: the
//!   first 4 KiB of base64 are decoded, then 64 KiB if the header was not
//!   there; nothing is decoded to pixels. An image whose header lies further
//!   in (some TIFFs) counts at the worst case below.
//! - A remote `http(s)` image is not fetched for the estimate (a client over
//!   budget must not make Iris fetch anything), so it counts at the formula's
//!   worst case, [`WORST_CASE_IMAGE_TOKENS`] (1445: 768×2048, 8 tiles);
//!   settlement corrects it. The same worst case covers a `data:` URI whose
//!   dimensions cannot be read.

use base64::Engine;

use crate::images::data_uri::DataUri;
use crate::openai::chat::{ChatRequest, Content, PartKind};
use crate::openai::embeddings::{EmbeddingsRequest, InputItem};
use crate::openai::raw;

/// An image with `detail: "low"`.
pub const LOW_DETAIL_TOKENS: u64 = 85;
const TILE_TOKENS: u64 = 170;
/// The most a high-detail image can cost under the tile formula.
pub const WORST_CASE_IMAGE_TOKENS: u64 = LOW_DETAIL_TOKENS + TILE_TOKENS * 8;

/// Tokens every message costs beyond its content (OpenAI's chat format),
/// and those priming the reply.
const PER_MESSAGE: u64 = 3;
const REPLY_PRIMING: u64 = 3;

/// Text is tokenized in pieces of at most this many bytes: the tokenizer's
/// backtracking pattern can fail on a run of hundreds of thousands of
/// identical characters, and a piece bounds the work of one merge. Splitting changes the count
/// by at most a token per piece.
const PIECE: usize = 4096;

/// How much base64 is decoded to find an image's dimensions: a small prefix
/// holds the header of almost every PNG, GIF, WebP and BMP and most JPEGs;
/// the larger one covers JPEGs with big EXIF or colour-profile blocks. The
/// image's validation decodes it whole later anyway, so the estimate never
/// does: where no header is found, the image counts at the worst case.
const HEADER_PREFIXES: [usize; 2] = [4 * 1024, 64 * 1024];
/// Bodies with more than this outside their images are estimated on the
/// blocking pool: o200k's regex tokenizes only a few MB/s (about 0.13 ms per
/// KiB measured in release), so a larger prompt would hold an async worker
/// for longer than the hop to the pool (tens of µs) costs.
pub const OFFLOAD_BYTES: usize = 1024;

/// The cost of one request as reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Estimate {
    pub prompt: u64,
    pub completion: u64,
}

impl Estimate {
    pub fn total(&self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }
}

/// Compiles the tokenizer's pattern so the first request does not wait.
pub fn warm() {
    let _ = count_tokens("warm");
}

/// Tokens in `text` under o200k_base ([`super::o200k`]); a piece the
/// tokenizer cannot count (its pattern's backtracking limit) counts a token
/// per 4 bytes.
pub fn count_tokens(text: &str) -> u64 {
    pieces(text)
        .map(|piece| {
            std::panic::catch_unwind(|| super::o200k::count(piece))
                .ok()
                .flatten()
                .unwrap_or_else(|| rough_prompt(piece.len()))
        })
        .sum()
}

/// [`count_tokens`] for a prompt's text, which the client may well send
/// again: kept by [`super::counted`], so a system prompt or a conversation's
/// earlier messages are tokenized once, not with every request.
pub fn count_prompt_tokens(text: &str) -> u64 {
    super::counted::count_or(text, count_tokens)
}

/// Splits `text` into pieces of at most [`PIECE`] bytes, at whitespace where
/// there is some in the piece's second half, else at a character boundary.
fn pieces(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        if rest.len() <= PIECE {
            return Some(std::mem::take(&mut rest));
        }
        let mut end = PIECE;
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        // `end` is a character boundary; a whitespace found before it starts
        // at one too (slicing from PIECE / 2 could split a character).
        if let Some(space) = rest[..end]
            .rfind(char::is_whitespace)
            .filter(|&space| space >= PIECE / 2)
        {
            end = space;
        }
        let (piece, tail) = rest.split_at(end.max(1));
        rest = tail;
        Some(piece)
    })
}

/// The whole request's cost: prompt (text, images, tools) and completion
/// cap (`max_completion_tokens`, else `max_tokens`, else `default_cap`, the
/// model's `max_output_tokens`), times `n` choices.
pub fn estimate(request: &ChatRequest<'_>, default_cap: u64) -> Estimate {
    Estimate {
        prompt: prompt_tokens(request),
        completion: completion_cap(request, default_cap),
    }
}

/// The completion cap times `n` choices.
fn completion_cap(request: &ChatRequest<'_>, default_cap: u64) -> u64 {
    let cap = request.completion_cap.unwrap_or(default_cap);
    cap.saturating_mul(request.choices)
}

/// A prompt's tokens guessed from its size alone (about 4 bytes a token in
/// English under o200k), for a request no token limit applies to.
pub fn rough_prompt(text_bytes: usize) -> u64 {
    text_bytes.div_ceil(4) as u64
}

/// Bytes of the body outside its images' URLs: what the tokenizer reads
/// (image data is not tokenized; only its header is read).
fn text_bytes(body_len: usize, request: &ChatRequest<'_>) -> usize {
    let image_bytes: usize = request.images().map(|(_, image)| image.url.len()).sum();
    body_len.saturating_sub(image_bytes)
}

/// Whether [`estimate_counting`] tokenizes enough text (over
/// [`OFFLOAD_BYTES`]) that the caller should run it off the async threads:
/// text whose count is not kept already (a system prompt sent again is
/// looked up, not tokenized).
pub fn is_heavy(body_len: usize, request: &ChatRequest<'_>, count: bool) -> bool {
    if !count || text_bytes(body_len, request) <= OFFLOAD_BYTES {
        return false;
    }
    let mut uncounted = 0;
    each_prompt_piece(request, |piece| {
        if let Piece::Text(text) = piece
            && !super::counted::is_kept(text)
        {
            uncounted += text.len();
        }
    });
    uncounted > OFFLOAD_BYTES
}

/// [`estimate`] of a request whose body is `body_len` bytes.
///
/// `count`: whether any token limit applies to the request (the client's
/// budget or its upstreams' pacing). Without one the prompt is not tokenized
/// at all: nothing is decided on it, so [`rough_prompt`] stands in for the
/// log line, and the reservation counts it exactly only if it has to settle
/// without the upstream's usage ([`crate::budget::Reservation::count_prompt_later`]).
pub fn estimate_counting(
    body_len: usize,
    request: &ChatRequest<'_>,
    default_cap: u64,
    count: bool,
) -> Estimate {
    if !count {
        return Estimate {
            prompt: rough_prompt(text_bytes(body_len, request)),
            completion: completion_cap(request, default_cap),
        };
    }
    estimate(request, default_cap)
}

/// What an embeddings request may cost: its input's tokens (counted with
/// the tokenizer when `count`, else a token per 4 bytes of text; a token
/// array is its length), and no completion. Embeddings upstreams report
/// their count, which settlement charges instead.
pub fn embeddings_estimate(request: &EmbeddingsRequest<'_>, count: bool) -> Estimate {
    let mut prompt = 0u64;
    request.each_input(|item| {
        prompt = prompt.saturating_add(match item {
            InputItem::Text(text) if count => count_prompt_tokens(text),
            InputItem::Text(text) => rough_prompt(text.len()),
            InputItem::Tokens(n) => n,
        });
    });
    Estimate {
        prompt,
        completion: 0,
    }
}

/// Tokens of the prompt: each message's role, name, text, images and tool
/// calls, plus the tool and response-format definitions.
pub fn prompt_tokens(request: &ChatRequest<'_>) -> u64 {
    let mut total = REPLY_PRIMING + PER_MESSAGE * request.messages.len() as u64;
    each_prompt_piece(request, |piece| {
        total += match piece {
            Piece::Text(text) => count_prompt_tokens(text),
            Piece::Image(url, detail) => image_tokens(url, detail),
        };
    });
    total
}

/// A part of a prompt the estimate counts.
enum Piece<'a> {
    Text(&'a str),
    /// An image's URL and `detail`.
    Image(&'a str, Option<&'a str>),
}

/// Calls `f` with each part of the prompt that [`prompt_tokens`] counts.
fn each_prompt_piece(request: &ChatRequest<'_>, mut f: impl FnMut(Piece<'_>)) {
    for message in &request.messages {
        for key in ["role", "name"] {
            if let Some(value) = message.raw_field(key).and_then(raw::as_str) {
                f(Piece::Text(&value));
            }
        }
        for key in ["tool_calls", "function_call", "tool_call_id"] {
            if let Some(value) = message.raw_field(key) {
                f(Piece::Text(value.get()));
            }
        }
        match &message.content {
            Content::Text(text) => f(Piece::Text(text)),
            Content::Parts(parts) => {
                for part in parts {
                    match &part.kind {
                        PartKind::Text(text) => f(Piece::Text(text)),
                        PartKind::Image(image) => {
                            f(Piece::Image(&image.url, image.detail.as_deref()));
                        }
                        PartKind::Other => {}
                    }
                }
            }
            Content::Absent | Content::Null => {}
        }
    }
    for key in ["tools", "functions", "response_format"] {
        if let Some(value) = request.raw_field(key) {
            f(Piece::Text(value.get()));
        }
    }
}

/// One image's tokens, from its URL and `detail` (see the module docs).
pub fn image_tokens(url: &str, detail: Option<&str>) -> u64 {
    if detail.is_some_and(|d| d.eq_ignore_ascii_case("low")) {
        return LOW_DETAIL_TOKENS;
    }
    data_uri_dimensions(url).map_or(WORST_CASE_IMAGE_TOKENS, |(w, h)| tile_tokens(w, h))
}

/// OpenAI's high-detail formula for a `width`×`height` image.
pub fn tile_tokens(width: u32, height: u32) -> u64 {
    let (mut w, mut h) = (f64::from(width.max(1)), f64::from(height.max(1)));
    let fit = (2048.0 / w.max(h)).min(1.0);
    (w, h) = (w * fit, h * fit);
    let shortest = (768.0 / w.min(h)).min(1.0);
    (w, h) = ((w * shortest).round(), (h * shortest).round());
    let tiles = (w / 512.0).ceil().max(1.0) * (h / 512.0).ceil().max(1.0);
    LOW_DETAIL_TOKENS + TILE_TOKENS * tiles as u64
}

/// The dimensions of a base64 `data:` URI image, from its header.
fn data_uri_dimensions(url: &str) -> Option<(u32, u32)> {
    let uri = DataUri::parse(url).ok().filter(|uri| uri.base64)?;
    // Bytes, not `str`: a client's malformed URI may hold multi-byte
    // characters, and a `str` cut at an arbitrary length would panic.
    let data = uri.data.trim_end_matches('=').as_bytes();
    let mut tried = 0;
    for limit in HEADER_PREFIXES {
        let prefix = &data[..data.len().min(limit) / 4 * 4];
        if prefix.len() == tried {
            break;
        }
        tried = prefix.len();
        let dims = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(prefix)
            .ok()
            .and_then(|bytes| crate::images::dimensions(&bytes));
        if dims.is_some() {
            return dims;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_multibyte_text_and_malformed_data_uris_do_not_panic() {
        let japanese = "日本語".repeat(2000);
        assert!(count_tokens(&japanese) > 0);
        let pieces: String = pieces(&japanese).collect();
        assert_eq!(pieces, japanese);
        assert_eq!(
            image_tokens("data:image/png;base64,AAAé", None),
            WORST_CASE_IMAGE_TOKENS
        );
        assert_eq!(
            image_tokens("https://x/a.png", Some("LOW")),
            LOW_DETAIL_TOKENS
        );
    }

    use crate::images::test_png as png;

    fn data_uri(bytes: &[u8]) -> String {
        format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        )
    }

    #[test]
    fn counts_with_o200k() {
        assert_eq!(count_tokens(""), 0);
        assert_eq!(count_tokens("Hello, world!"), 4);
        assert_eq!(count_tokens("word0 word1 word2 "), 7);
    }

    #[test]
    fn pathological_text_is_counted_without_panicking() {
        for text in [
            "A".repeat(1_000_000),
            "^".repeat(1_000_000),
            " ".repeat(300_000),
        ] {
            let tokens = count_tokens(&text);
            assert!(tokens > 0 && tokens <= text.len() as u64, "{tokens}");
        }
        let mixed = "héllo wörld ".repeat(10_000);
        let whole = count_tokens(&mixed);
        assert!(pieces(&mixed).all(|p| p.len() <= PIECE));
        assert_eq!(pieces(&mixed).collect::<String>(), mixed);
        let unsplit = super::super::o200k::count(&mixed).expect("tokenizer");
        let pieces = pieces(&mixed).count() as u64;
        assert!(whole.abs_diff(unsplit) <= pieces, "{whole} vs {unsplit}");
    }

    #[test]
    fn tile_formula_matches_openais_examples() {
        assert_eq!(tile_tokens(1024, 1024), 765);
        assert_eq!(tile_tokens(2048, 4096), 1105);
        assert_eq!(tile_tokens(512, 512), 255);
        assert_eq!(tile_tokens(100, 100), 255);
        assert_eq!(tile_tokens(768, 2048), WORST_CASE_IMAGE_TOKENS);
    }

    #[test]
    fn the_worst_case_is_the_formulas_maximum() {
        let mut max = 0;
        for w in (16..=6000).step_by(37) {
            for h in (16..=6000).step_by(41) {
                max = max.max(tile_tokens(w, h));
            }
        }
        assert!(max <= WORST_CASE_IMAGE_TOKENS, "{max}");
        assert_eq!(tile_tokens(700, 2048), WORST_CASE_IMAGE_TOKENS);
    }

    #[test]
    fn images_are_estimated_from_their_header() {
        let uri = data_uri(&png(1024, 1024));
        assert_eq!(image_tokens(&uri, None), 765);
        // RFC 2397's scheme and `;base64` are case-insensitive, as in validation.
        let shouted = uri.replacen("data:image/png;base64", "DATA:image/PNG;BASE64", 1);
        assert_eq!(image_tokens(&shouted, None), 765);
        assert_eq!(image_tokens(&uri, Some("high")), 765);
        assert_eq!(image_tokens(&uri, Some("low")), LOW_DETAIL_TOKENS);
        assert_eq!(
            image_tokens("https://example.com/cat.png", Some("auto")),
            WORST_CASE_IMAGE_TOKENS
        );
        assert_eq!(image_tokens("https://example.com/cat.png", Some("low")), 85);
        assert_eq!(
            image_tokens("data:image/png;base64,!!!notbase64", None),
            WORST_CASE_IMAGE_TOKENS
        );
        assert_eq!(
            image_tokens("data:image/png,rawbytes", None),
            WORST_CASE_IMAGE_TOKENS
        );
    }

    #[test]
    fn only_the_header_of_a_large_image_is_decoded() {
        // A valid PNG header followed by garbage: dimensions still come out
        // of the prefix; the rest is never decoded.
        let mut bytes = png(300, 200);
        bytes.extend(std::iter::repeat_n(0xAB, 10 * 1024 * 1024));
        assert_eq!(data_uri_dimensions(&data_uri(&bytes)), Some((300, 200)));
    }

    #[test]
    fn estimates_prompt_images_tools_and_completion_cap() {
        let body = serde_json::json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}}
                ]}
            ],
            "max_tokens": 100,
            "n": 2,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]
        })
        .to_string();
        let request = ChatRequest::parse(body.as_bytes()).expect("valid");
        let estimate = estimate(&request, 4096);
        assert_eq!(estimate.completion, 200);
        let text = count_tokens("system")
            + count_tokens("Be brief.")
            + count_tokens("user")
            + count_tokens("What is this?");
        let tools = count_tokens(request.raw_field("tools").expect("tools").get());
        assert_eq!(
            estimate.prompt,
            REPLY_PRIMING + 2 * PER_MESSAGE + text + 85 + tools
        );

        let plain =
            ChatRequest::parse(br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#)
                .expect("valid");
        assert_eq!(super::estimate(&plain, 4096).completion, 4096);
    }

    /// A prompt's texts are kept counted: the same request estimated again
    /// finds its system prompt's and its message's counts, and the same
    /// estimate; the text of a completion (counted when no usage came) is
    /// not kept.
    #[test]
    fn a_prompts_texts_are_kept_counted_and_estimate_the_same_again() {
        let system = "estimate: a system prompt sent with every request";
        let user = "estimate: a question of this test alone";
        let body = serde_json::json!({"model": "m", "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": user}
        ]})
        .to_string();
        let request = ChatRequest::parse(body.as_bytes()).expect("valid");
        let first = prompt_tokens(&request);
        assert!(super::super::counted::is_kept(system));
        assert!(super::super::counted::is_kept(user));
        assert_eq!(prompt_tokens(&request), first);
        assert_eq!(
            first,
            REPLY_PRIMING
                + 2 * PER_MESSAGE
                + count_tokens("system")
                + count_tokens(system)
                + count_tokens("user")
                + count_tokens(user)
        );
        let completion = "estimate: a completion of this test alone";
        count_tokens(completion);
        assert!(!super::super::counted::is_kept(completion));
    }

    /// Times the estimate of a chat with a 4 KiB system prompt, the first
    /// time (tokenized) and again (looked up). Run with
    /// `cargo test --release --lib estimate_of_a_repeated_prompt -- --ignored --nocapture`.
    #[test]
    #[ignore = "benchmark"]
    fn estimate_of_a_repeated_prompt() {
        let system = "You answer questions about the product, politely and briefly. "
            .repeat(64)
            .chars()
            .take(4096)
            .collect::<String>();
        let body = serde_json::json!({"model": "m", "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": "How do I reset my password?"}
        ]})
        .to_string();
        let request = ChatRequest::parse(body.as_bytes()).expect("valid");
        warm();
        let started = std::time::Instant::now();
        let first = prompt_tokens(&request);
        let tokenized = started.elapsed();
        let started = std::time::Instant::now();
        for _ in 0..1000 {
            assert_eq!(prompt_tokens(&request), first);
        }
        let looked_up = started.elapsed() / 1000;
        println!(
            "prompt of {} bytes, {first} tokens: first estimate {tokenized:?}, again {looked_up:?}",
            body.len()
        );
    }

    #[test]
    fn only_a_counted_prompt_of_more_than_a_few_kib_of_new_text_is_heavy() {
        let text = "Many words to count, over and over (heavy). ".repeat(4000);
        let body =
            serde_json::json!({"model": "m", "messages": [{"role": "user", "content": text}]})
                .to_string();
        let request = ChatRequest::parse(body.as_bytes()).expect("valid");
        assert!(is_heavy(body.len(), &request, true));
        assert!(!is_heavy(body.len(), &request, false), "not tokenized");
        let counted = estimate_counting(body.len(), &request, 10, true);
        assert_eq!(counted, estimate(&request, 10));
        assert!(counted.prompt > 30_000, "{counted:?}");
        assert!(
            !is_heavy(body.len(), &request, true),
            "its count is kept: looked up, not tokenized"
        );

        let image = format!("data:image/png;base64,{}", "A".repeat(64 * 1024));
        let body = serde_json::json!({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image}}
        ]}]})
        .to_string();
        let request = ChatRequest::parse(body.as_bytes()).expect("valid");
        assert!(
            !is_heavy(body.len(), &request, true),
            "image data is not tokenized"
        );
    }
}
