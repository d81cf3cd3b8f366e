//! The parts of a chat completion request Iris looks inside: `model`,
//! `stream`, `stream_options`, the completion caps, and each message's content
//! parts. Everything else stays raw and is written back untouched.
//!
//! - `parse`: [`ChatRequest::parse`], one serde pass borrowing from the body
//! - this module: the parsed request, the walk over its image parts, and
//!   what may change before it goes upstream
//! - `write`: the request as it goes upstream

mod parse;
#[cfg(test)]
mod tests;
mod urls;
mod write;

pub use parse::MAX_CHOICES;
pub use write::NOT_IN_CACHE_KEY;

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::value::RawValue;

use super::raw::{self, RawObject};
use super::spliced::{SPLICE_MIN_BYTES, shared_piece, within};

/// Why a body is not a chat completion request: the message for the client
/// and the field it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RequestError {
    pub message: String,
    /// The offending field, e.g. `messages[0].content[1].image_url.url`.
    pub param: Option<String>,
}

impl RequestError {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            param: None,
        }
    }

    pub fn at(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            param: Some(param.into()),
        }
    }

    /// A body that is not UTF-8, as JSON must be (RFC 8259, 8.1).
    ///
    /// Refused whole rather than read as bytes: the fields Iris does not
    /// read go upstream as they came, and upstream parsers differ on bytes
    /// that are not UTF-8 (refused, replaced, or passed on). Checked once
    /// for the whole body, it also spares the parse a check of each string
    /// it reads (serde_json reading bytes checks every one, a call each).
    pub fn not_utf8(error: std::str::Utf8Error) -> Self {
        Self::new(format!(
            "The request body is not valid JSON: it is not UTF-8 (an invalid byte at offset {}).",
            error.valid_up_to()
        ))
    }
}

/// How much of a request's shape Iris takes: each message and content part
/// costs memory to parse (a few dozen bytes) whatever its size in the body,
/// so their number is bounded rather than only the body's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Messages in `messages`.
    pub max_messages: usize,
    /// Content parts across all messages.
    pub max_content_parts: usize,
}

impl RequestLimits {
    pub const DEFAULT: Self = Self {
        max_messages: 4096,
        max_content_parts: 8192,
    };
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A parsed chat completion request, borrowing from the request body.
#[derive(Debug)]
pub struct ChatRequest<'a> {
    body: RawObject<'a>,
    pub model: Cow<'a, str>,
    pub stream: bool,
    /// The client asked for `stream_options.include_usage`.
    pub include_usage: bool,
    /// The larger of `max_completion_tokens` and `max_tokens`, when the
    /// client set one: an upstream may honour either.
    pub completion_cap: Option<u64>,
    /// `n`, the number of choices (1 when not set).
    pub choices: u64,
    pub messages: Vec<Message<'a>>,
    /// Set when a message may have changed, so only then is `messages` rewritten.
    messages_changed: bool,
    /// Set when a top-level field was replaced.
    body_changed: bool,
    /// The body's length as received, to size the rewritten one.
    body_len: usize,
}

#[derive(Debug)]
pub struct Message<'a> {
    fields: RawObject<'a>,
    pub content: Content<'a>,
}

#[derive(Debug)]
pub enum Content<'a> {
    /// No `content` (e.g. an assistant message with tool calls).
    Absent,
    /// `content: null`.
    Null,
    Text(Cow<'a, str>),
    Parts(Vec<Part<'a>>),
}

#[derive(Debug)]
pub struct Part<'a> {
    fields: RawObject<'a>,
    pub kind: PartKind<'a>,
}

#[derive(Debug)]
pub enum PartKind<'a> {
    Text(Cow<'a, str>),
    Image(ImagePart<'a>),
    /// Audio, files and part types Iris does not know: passed through
    /// (without URLs: the parser refuses them outside image parts).
    Other,
}

/// An `image_url` content part.
#[derive(Debug)]
pub struct ImagePart<'a> {
    fields: RawObject<'a>,
    pub url: ImageUrl<'a>,
    pub detail: Option<Cow<'a, str>>,
    changed: bool,
}

impl ImagePart<'_> {
    /// Replaces the URL (e.g. by a `data:` URI).
    pub fn set_url(&mut self, url: String) {
        self.url = ImageUrl(UrlText::Text(Cow::Owned(url)));
        self.changed = true;
    }

    /// Replaces the URL by a data URI Iris wrote, shared with the image
    /// cache: a data URI of several megabytes is spliced into the upstream
    /// body, never copied on its way there. It must be one Iris wrote (a
    /// media type and base64): it is sent as it is, with nothing escaped.
    pub fn set_url_shared(&mut self, url: Arc<String>) {
        debug_assert!(
            !raw::needs_escaping(url.as_bytes()),
            "a shared URL is sent unescaped"
        );
        self.url = ImageUrl(UrlText::Shared(url));
        self.changed = true;
    }

    /// Drops `detail`, for upstreams that reject the field.
    pub fn strip_detail(&mut self) {
        if self.fields.remove("detail") {
            self.changed = true;
        }
    }
}

/// An image part's URL: as the client sent it, or a replacement (owned, or
/// shared with the image cache). Reads as a `&str`.
#[derive(Debug, Clone)]
pub struct ImageUrl<'a>(UrlText<'a>);

#[derive(Debug, Clone)]
enum UrlText<'a> {
    Text(Cow<'a, str>),
    Shared(Arc<String>),
}

impl ImageUrl<'_> {
    pub fn as_str(&self) -> &str {
        match &self.0 {
            UrlText::Text(text) => text,
            UrlText::Shared(text) => text,
        }
    }

    /// Whether it is sent as a piece of its own ([`Self::piece`]).
    fn is_spliced(&self, received: &Bytes) -> bool {
        self.len() >= SPLICE_MIN_BYTES
            && match &self.0 {
                UrlText::Shared(_) => true,
                // Borrowed: the string had no escapes, so its text in the
                // body is exactly its value.
                UrlText::Text(Cow::Borrowed(text)) => within(received, text.as_bytes()),
                UrlText::Text(Cow::Owned(_)) => false,
            }
    }

    /// The URL as a piece of the upstream body that needs no copy: a long
    /// data URI of the image cache's, or a long one of the client's still
    /// in the `received` body.
    fn piece(&self, received: &Bytes) -> Option<Bytes> {
        if !self.is_spliced(received) {
            return None;
        }
        Some(match &self.0 {
            UrlText::Shared(text) => shared_piece(text),
            UrlText::Text(text) => received.slice_ref(text.as_bytes()),
        })
    }
}

impl std::ops::Deref for ImageUrl<'_> {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for ImageUrl<'_> {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Display for ImageUrl<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for ImageUrl<'_> {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for ImageUrl<'_> {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// Where an image part sits in the request; displays as its `param` path,
/// `messages[i].content[j].image_url.url`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageAt {
    pub message: usize,
    pub part: usize,
}

impl fmt::Display for ImageAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "messages[{}].content[{}].image_url.url",
            self.message, self.part
        )
    }
}

impl<'a> ChatRequest<'a> {
    /// Every image part, in order, with where it sits: the one walk over a
    /// request's images that validation, the estimate and the rewrite share.
    pub fn images(&self) -> impl Iterator<Item = (ImageAt, &ImagePart<'a>)> {
        self.messages.iter().enumerate().flat_map(|(message, m)| {
            let parts: &[Part<'a>] = match &m.content {
                Content::Parts(parts) => parts,
                _ => &[],
            };
            parts
                .iter()
                .enumerate()
                .filter_map(move |(part, p)| match &p.kind {
                    PartKind::Image(image) => Some((ImageAt { message, part }, image)),
                    _ => None,
                })
        })
    }

    /// [`ChatRequest::images`], to change them.
    pub fn images_mut(&mut self) -> impl Iterator<Item = (ImageAt, &mut ImagePart<'a>)> {
        self.messages_changed = true;
        self.messages
            .iter_mut()
            .enumerate()
            .flat_map(|(message, m)| {
                let parts: &mut [Part<'a>] = match &mut m.content {
                    Content::Parts(parts) => parts,
                    _ => &mut [],
                };
                parts
                    .iter_mut()
                    .enumerate()
                    .filter_map(move |(part, p)| match &mut p.kind {
                        PartKind::Image(image) => Some((ImageAt { message, part }, image)),
                        _ => None,
                    })
            })
    }

    pub fn image_count(&self) -> usize {
        self.images().count()
    }

    /// A top-level field Iris interprets, as sent (`tools`, …), for estimates.
    pub fn raw_field(&self, key: &str) -> Option<&RawValue> {
        self.body.get(key)
    }

    /// Sends `model` upstream under another name.
    pub fn set_model(&mut self, name: &str) {
        self.body.replace("model", raw::raw_string(name));
        self.body_changed = true;
        self.model = Cow::Owned(name.to_owned());
    }

    /// Asks the upstream for the final usage chunk of a stream, keeping any
    /// other `stream_options` the client sent.
    pub fn request_stream_usage(&mut self) {
        let mut options: RawObject<'_> = self
            .body
            .get("stream_options")
            .and_then(|raw| RawObject::parse(raw.get(), parse::STREAM_OPTIONS_FIELDS))
            .unwrap_or_default();
        options.replace("include_usage", raw::raw_from_vec(b"true".to_vec()));
        let mut text = Vec::new();
        options.write(&mut text);
        let value = raw::raw_from_vec(text);
        self.body.replace("stream_options", value);
        self.body_changed = true;
    }

    /// Whether anything differs from the body as received; if not, the
    /// original bytes can be forwarded as they are.
    pub fn changed(&self) -> bool {
        self.body_changed || (self.messages_changed && self.messages.iter().any(Message::changed))
    }
}

impl Message<'_> {
    /// The message's text content, for token estimates.
    pub fn texts(&self) -> impl Iterator<Item = &str> {
        let (text, parts) = match &self.content {
            Content::Text(text) => (Some(text.as_ref()), None),
            Content::Parts(parts) => (None, Some(parts)),
            Content::Absent | Content::Null => (None, None),
        };
        text.into_iter()
            .chain(parts.into_iter().flatten().filter_map(|p| match &p.kind {
                PartKind::Text(text) => Some(text.as_ref()),
                _ => None,
            }))
    }

    /// Interpreted fields other than `content` (role, name, tool calls), for estimates.
    pub fn raw_field(&self, key: &str) -> Option<&RawValue> {
        self.fields.get(key)
    }
}
