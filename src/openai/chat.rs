//! The parts of a chat completion request Iris looks inside: `model`,
//! `stream`, `stream_options`, the completion caps, and each message's content
//! parts. Everything else stays raw and is written back untouched.

use std::borrow::Cow;
use std::cell::RefCell;
use std::fmt;
use std::sync::Arc;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::raw::{self, Claim, RawObject};
use crate::error::ApiError;

/// Deeper JSON is refused: serde_json's own default recursion limit.
const MAX_NESTING: usize = 128;

/// A parsed chat completion request, borrowing from the request body.
#[derive(Debug)]
pub struct ChatRequest<'a> {
    body: RawObject<'a>,
    pub model: Cow<'a, str>,
    pub stream: bool,
    /// The client asked for `stream_options.include_usage`.
    pub include_usage: bool,
    /// `max_completion_tokens`, else `max_tokens`, when the client set one.
    pub completion_cap: Option<u64>,
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
    /// An `image_url` object parsed before the part's `type` said it is no
    /// image part: kept only to be written back.
    stray_image: Option<ImagePart<'a>>,
}

#[derive(Debug)]
pub enum PartKind<'a> {
    Text(Cow<'a, str>),
    Image(ImagePart<'a>),
    /// Audio, files and part types Iris does not know: passed through.
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

    /// Replaces the URL by one shared with the image cache: a data URI of
    /// several megabytes is written into the upstream body, never copied
    /// on its way there.
    pub fn set_url_shared(&mut self, url: Arc<String>) {
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

fn invalid(param: impl Into<String>, message: impl Into<String>) -> ApiError {
    ApiError::invalid_request(message).with_param(param)
}

impl<'a> ChatRequest<'a> {
    /// Parses a request body, refusing what is not a chat completion request
    /// with `invalid_request` and the offending `param`.
    pub fn parse(body: &'a [u8]) -> Result<Self, ApiError> {
        if raw::nests_deeper_than(body, MAX_NESTING) {
            return Err(ApiError::invalid_request(format!(
                "The request body nests arrays and objects deeper than {MAX_NESTING} levels."
            )));
        }
        let shape = ShapeError::default();
        let mut deserializer = serde_json::Deserializer::from_slice(body);
        let parsed = TopLevelSeed(&shape)
            .deserialize(&mut deserializer)
            .and_then(|top| deserializer.end().map(|()| top));
        let (object, messages) = match parsed {
            Ok(top) => top,
            Err(e) => {
                return Err(shape.take().unwrap_or_else(|| {
                    ApiError::invalid_request(format!(
                        "The request body is not a valid JSON object: {e}."
                    ))
                }));
            }
        };

        let model = match object.get_borrowed("model") {
            None => return Err(invalid("model", "Missing required parameter: 'model'.")),
            Some(raw) => raw::as_str(raw)
                .filter(|m| !m.is_empty())
                .ok_or_else(|| invalid("model", "'model' must be a non-empty string."))?,
        };

        let stream = match object.get("stream") {
            None => false,
            Some(raw) => match raw.get() {
                "true" => true,
                "false" | "null" => false,
                _ => return Err(invalid("stream", "'stream' must be a boolean.")),
            },
        };

        let include_usage = match object.get("stream_options") {
            None => false,
            Some(raw) if raw.get() == "null" => false,
            Some(raw) => {
                let options: RawObject<'_> = serde_json::from_str(raw.get()).map_err(|_| {
                    invalid("stream_options", "'stream_options' must be an object.")
                })?;
                options
                    .get("include_usage")
                    .is_some_and(|v| v.get() == "true")
            }
        };

        let completion_cap = match cap(&object, "max_completion_tokens")? {
            Some(cap) => Some(cap),
            None => cap(&object, "max_tokens")?,
        };

        let messages = match messages {
            None => {
                return Err(invalid(
                    "messages",
                    "Missing required parameter: 'messages'.",
                ));
            }
            Some(messages) if messages.is_empty() => {
                return Err(invalid(
                    "messages",
                    "'messages' must contain at least one message.",
                ));
            }
            Some(messages) => messages,
        };

        Ok(Self {
            body: object,
            model,
            stream,
            include_usage,
            completion_cap,
            messages,
            messages_changed: false,
            body_changed: false,
            body_len: body.len(),
        })
    }

    /// The request's image parts with their `param` paths, in order.
    pub fn images_mut(&mut self) -> impl Iterator<Item = (String, &mut ImagePart<'a>)> {
        self.messages_changed = true;
        self.messages
            .iter_mut()
            .enumerate()
            .flat_map(|(i, message)| match &mut message.content {
                Content::Parts(parts) => parts
                    .iter_mut()
                    .enumerate()
                    .filter_map(move |(j, part)| match &mut part.kind {
                        PartKind::Image(image) => {
                            Some((format!("messages[{i}].content[{j}].image_url.url"), image))
                        }
                        _ => None,
                    })
                    .collect::<Vec<_>>(),
                _ => Vec::new(),
            })
    }

    /// The request's image parts with their `param` paths, in order, read-only.
    pub fn images_with_params(&self) -> impl Iterator<Item = (String, &ImagePart<'a>)> {
        self.messages
            .iter()
            .enumerate()
            .flat_map(|(i, message)| match &message.content {
                Content::Parts(parts) => parts
                    .iter()
                    .enumerate()
                    .filter_map(move |(j, part)| match &part.kind {
                        PartKind::Image(image) => {
                            Some((format!("messages[{i}].content[{j}].image_url.url"), image))
                        }
                        _ => None,
                    })
                    .collect::<Vec<_>>(),
                _ => Vec::new(),
            })
    }

    pub fn image_count(&self) -> usize {
        self.images().count()
    }

    pub fn images(&self) -> impl Iterator<Item = &ImagePart<'a>> {
        self.messages
            .iter()
            .flat_map(|message| match &message.content {
                Content::Parts(parts) => parts
                    .iter()
                    .filter_map(|part| match &part.kind {
                        PartKind::Image(image) => Some(image),
                        _ => None,
                    })
                    .collect::<Vec<_>>(),
                _ => Vec::new(),
            })
    }

    /// A top-level field as sent (`tools`, `n`, …), for estimates.
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
            .and_then(|raw| serde_json::from_str::<RawObject<'_>>(raw.get()).ok())
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

    /// Writes the request as it should go upstream.
    pub fn to_body(&self) -> Vec<u8> {
        // Sized once: with megabytes of inlined images, regrowing means
        // touching fresh pages again and again.
        let replaced: usize = self
            .images()
            .filter(|image| image.changed)
            .map(|image| image.url.len() + 2)
            .sum();
        let mut out = Vec::with_capacity(self.body_len + replaced + 256);
        self.body.write_with(&mut out, |key, out| {
            if key != "messages" {
                return false;
            }
            out.push(b'[');
            for (i, message) in self.messages.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                message.write(out);
            }
            out.push(b']');
            true
        });
        out
    }
}

fn cap(object: &RawObject<'_>, key: &str) -> Result<Option<u64>, ApiError> {
    match object.get(key) {
        None => Ok(None),
        Some(raw) if raw.get() == "null" => Ok(None),
        Some(raw) => raw
            .get()
            .parse::<u64>()
            .map(Some)
            .map_err(|_| invalid(key, format!("'{key}' must be a non-negative integer."))),
    }
}

/// The first request-shape error met while parsing, with its `param`.
/// Parsing is one serde pass through nested seeds; a seed that finds a field
/// of the wrong kind records the client-facing error here and aborts.
#[derive(Default)]
struct ShapeError(RefCell<Option<ApiError>>);

impl ShapeError {
    fn fail<E: de::Error>(&self, param: String, message: &str) -> E {
        self.0
            .borrow_mut()
            .get_or_insert_with(|| invalid(param, message));
        E::custom(message)
    }

    fn take(&self) -> Option<ApiError> {
        self.0.borrow_mut().take()
    }
}

/// Implements a visitor's methods for the JSON kinds a field must not be,
/// each recording `$message` for `$param`.
macro_rules! refuse_kinds {
    ($shape:expr, $param:expr, $message:expr; $($kind:ident),*) => {
        $(refuse_kinds!(@one $kind, $shape, $param, $message);)*
    };
    (@one map, $shape:expr, $param:expr, $message:expr) => {
        fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
            Err($shape(&self).fail($param(&self), $message))
        }
    };
    (@one seq, $shape:expr, $param:expr, $message:expr) => {
        fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
            Err($shape(&self).fail($param(&self), $message))
        }
    };
    (@one str, $shape:expr, $param:expr, $message:expr) => {
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Err($shape(&self).fail($param(&self), $message))
        }
    };
    (@one unit, $shape:expr, $param:expr, $message:expr) => {
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Err($shape(&self).fail($param(&self), $message))
        }
    };
    (@one scalars, $shape:expr, $param:expr, $message:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Err($shape(&self).fail($param(&self), $message))
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Err($shape(&self).fail($param(&self), $message))
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Err($shape(&self).fail($param(&self), $message))
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Err($shape(&self).fail($param(&self), $message))
        }
    };
}

/// The top-level object: `messages` parsed, every other field kept raw.
struct TopLevelSeed<'s>(&'s ShapeError);

type TopLevel<'a> = (RawObject<'a>, Option<Vec<Message<'a>>>);

impl<'de> DeserializeSeed<'de> for TopLevelSeed<'_> {
    type Value = TopLevel<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for TopLevelSeed<'_> {
    type Value = TopLevel<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a chat completion request object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut messages = None;
        let object = RawObject::from_map(&mut map, |key, map| {
            if key != "messages" {
                return Ok(Claim::Raw);
            }
            messages = Some(map.next_value_seed(MessagesSeed(self.0))?);
            Ok(Claim::Parsed)
        })?;
        Ok((object, messages))
    }
}

struct MessagesSeed<'s>(&'s ShapeError);

impl<'de> DeserializeSeed<'de> for MessagesSeed<'_> {
    type Value = Vec<Message<'de>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for MessagesSeed<'_> {
    type Value = Vec<Message<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of messages")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut messages = Vec::with_capacity(seq.size_hint().unwrap_or(4));
        while let Some(message) = seq.next_element_seed(MessageSeed(self.0, messages.len()))? {
            messages.push(message);
        }
        Ok(messages)
    }

    refuse_kinds!(|s: &Self| s.0, |_: &Self| "messages".to_owned(),
        "'messages' must be an array of message objects."; map, str, unit, scalars);
}

/// Message `.1` of the request.
struct MessageSeed<'s>(&'s ShapeError, usize);

impl<'de> DeserializeSeed<'de> for MessageSeed<'_> {
    type Value = Message<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for MessageSeed<'_> {
    type Value = Message<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a message object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut content = Content::Absent;
        let fields = RawObject::from_map(&mut map, |key, map| {
            if key != "content" {
                return Ok(Claim::Raw);
            }
            content = map.next_value_seed(ContentSeed(self.0, self.1))?;
            Ok(Claim::Parsed)
        })?;
        Ok(Message { fields, content })
    }

    refuse_kinds!(|s: &Self| s.0, |s: &Self| format!("messages[{}]", s.1),
        "Each message must be an object."; seq, str, unit, scalars);
}

/// The `content` of message `.1`.
struct ContentSeed<'s>(&'s ShapeError, usize);

impl<'de> DeserializeSeed<'de> for ContentSeed<'_> {
    type Value = Content<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ContentSeed<'_> {
    type Value = Content<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string or an array of content parts")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Content::Null)
    }

    fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<Self::Value, E> {
        Ok(Content::Text(Cow::Borrowed(text)))
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
        Ok(Content::Text(Cow::Owned(text.to_owned())))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut parts = Vec::with_capacity(seq.size_hint().unwrap_or(2));
        while let Some(part) = seq.next_element_seed(PartSeed(self.0, self.1, parts.len()))? {
            parts.push(part);
        }
        Ok(Content::Parts(parts))
    }

    refuse_kinds!(|s: &Self| s.0, |s: &Self| format!("messages[{}].content", s.1),
        "'content' must be a string or an array of content parts."; map, scalars);
}

/// Content part `.2` of message `.1`.
struct PartSeed<'s>(&'s ShapeError, usize, usize);

impl PartSeed<'_> {
    fn at(&self) -> String {
        format!("messages[{}].content[{}]", self.1, self.2)
    }
}

impl<'de> DeserializeSeed<'de> for PartSeed<'_> {
    type Value = Part<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for PartSeed<'_> {
    type Value = Part<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a content part object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut part_type = None;
        let mut text = None;
        let mut image = None;
        let fields = RawObject::from_map(&mut map, |key, map| match key {
            "type" => {
                let raw: &'de RawValue = map.next_value()?;
                part_type = raw::as_str(raw);
                Ok(Claim::Peeked(raw))
            }
            "text" => {
                let raw: &'de RawValue = map.next_value()?;
                text = Some(raw);
                Ok(Claim::Peeked(raw))
            }
            // Another type's `image_url` (type seen first) is passed through as sent.
            "image_url" if part_type.as_deref().is_none_or(|t| t == "image_url") => {
                image = Some(map.next_value_seed(ImageSeed(self.0, self.at()))?);
                Ok(Claim::Parsed)
            }
            _ => Ok(Claim::Raw),
        })?;
        let at = self.at();
        let kind = match part_type.as_deref() {
            Some("text") => PartKind::Text(text.and_then(raw::as_str).ok_or_else(|| {
                self.0
                    .fail::<A::Error>(format!("{at}.text"), "A text part needs a string 'text'.")
            })?),
            Some("image_url") => PartKind::Image(image.take().ok_or_else(|| {
                self.0.fail::<A::Error>(
                    format!("{at}.image_url"),
                    "An image_url part needs an 'image_url' object.",
                )
            })?),
            _ => PartKind::Other,
        };
        Ok(Part {
            fields,
            kind,
            stray_image: image,
        })
    }

    refuse_kinds!(|s: &Self| s.0, |s: &Self| s.at(),
        "Each content part must be an object."; seq, str, unit, scalars);
}

/// The `image_url` object of the part at `.1`: `url` parsed (borrowed from
/// the body, so a large data URI is read once and never copied), `detail`
/// read, everything else raw.
struct ImageSeed<'s>(&'s ShapeError, String);

impl<'de> DeserializeSeed<'de> for ImageSeed<'_> {
    type Value = ImagePart<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ImageSeed<'_> {
    type Value = ImagePart<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an image_url object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let at = &self.1;
        let mut url = None;
        let mut detail = None;
        let fields = RawObject::from_map(&mut map, |key, map| match key {
            "url" => {
                url = Some(map.next_value_seed(UrlSeed(self.0, at))?);
                Ok(Claim::Parsed)
            }
            "detail" => {
                let raw: &'de RawValue = map.next_value()?;
                detail = match raw::kind(raw) {
                    "null" => None,
                    _ => Some(raw::as_str(raw).ok_or_else(|| {
                        self.0.fail::<A::Error>(
                            format!("{at}.image_url.detail"),
                            "'detail' must be a string.",
                        )
                    })?),
                };
                Ok(Claim::Peeked(raw))
            }
            _ => Ok(Claim::Raw),
        })?;
        let url = url.ok_or_else(|| {
            self.0.fail::<A::Error>(
                format!("{at}.image_url.url"),
                "'image_url.url' must be a string.",
            )
        })?;
        Ok(ImagePart {
            fields,
            url: ImageUrl(UrlText::Text(url)),
            detail,
            changed: false,
        })
    }

    refuse_kinds!(|s: &Self| s.0, |s: &Self| format!("{}.image_url", s.1),
        "'image_url' must be an object with a 'url'."; seq, str, unit, scalars);
}

/// An image's `url`: a string, borrowed from the body when unescaped.
struct UrlSeed<'s>(&'s ShapeError, &'s str);

impl<'de> DeserializeSeed<'de> for UrlSeed<'_> {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for UrlSeed<'_> {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a URL string")
    }

    fn visit_borrowed_str<E: de::Error>(self, url: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(url))
    }

    fn visit_str<E: de::Error>(self, url: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(url.to_owned()))
    }

    refuse_kinds!(|s: &Self| s.0, |s: &Self| format!("{}.image_url.url", s.1),
        "'image_url.url' must be a string."; map, seq, unit, scalars);
}

impl Message<'_> {
    fn changed(&self) -> bool {
        match &self.content {
            Content::Parts(parts) => parts
                .iter()
                .any(|p| matches!(&p.kind, PartKind::Image(i) if i.changed)),
            _ => false,
        }
    }

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

    /// Raw fields other than `content` (role, name, tool calls), for estimates.
    pub fn raw_field(&self, key: &str) -> Option<&RawValue> {
        self.fields.get(key)
    }

    fn write(&self, out: &mut Vec<u8>) {
        self.fields.write_with(out, |key, out| {
            if key != "content" {
                return false;
            }
            match &self.content {
                Content::Absent | Content::Null => out.extend_from_slice(b"null"),
                Content::Text(text) => raw::write_json_string(out, text),
                Content::Parts(parts) => {
                    out.push(b'[');
                    for (j, part) in parts.iter().enumerate() {
                        if j > 0 {
                            out.push(b',');
                        }
                        part.write(out);
                    }
                    out.push(b']');
                }
            }
            true
        });
    }
}

impl Part<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        let image = match &self.kind {
            PartKind::Image(image) => Some(image),
            _ => self.stray_image.as_ref(),
        };
        self.fields.write_with(out, |key, out| match (key, image) {
            ("image_url", Some(image)) => {
                image.write(out);
                true
            }
            _ => false,
        });
    }
}

impl ImagePart<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        self.fields.write_with(out, |key, out| {
            if key != "url" {
                return false;
            }
            raw::write_json_string(out, &self.url);
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_err(body: &str) -> (String, Option<String>) {
        let e = ChatRequest::parse(body.as_bytes()).expect_err("should fail");
        (e.code.to_string(), e.param)
    }

    #[test]
    fn reads_the_fields_iris_needs() {
        let body = br#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"max_tokens":50,"messages":[{"role":"user","content":[{"type":"text","text":"hi"},{"type":"image_url","image_url":{"url":"https://x/a.png","detail":"low"}}]}],"extra":{"kept":1}}"#;
        let request = ChatRequest::parse(body).expect("valid");
        assert_eq!(request.model, "m");
        assert!(request.stream && request.include_usage);
        assert_eq!(request.completion_cap, Some(50));
        assert_eq!(request.image_count(), 1);
        let image = request.images().next().expect("image");
        assert_eq!(image.url, "https://x/a.png");
        assert_eq!(image.detail.as_deref(), Some("low"));
        assert_eq!(request.messages[0].texts().collect::<Vec<_>>(), ["hi"]);
        assert_eq!(
            request.to_body(),
            body.to_vec(),
            "unchanged request is written back as sent"
        );
    }

    #[test]
    fn rewritten_bodies_keep_every_field_of_every_level() {
        let body = br#"{"model":"a","messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"t"}]},{"role":"user","content":[{"image_url":{"url":"https://x/b.png"},"type":"input_audio"},{"type":"text","text":"caf\u00e9","cache":1},{"type":"image_url","image_url":{"url":"https://x/a.png","extra":[1]}}]}]}"#;
        let mut request = ChatRequest::parse(body).expect("valid");
        assert_eq!(request.image_count(), 1, "only image_url parts are images");
        request.set_model("b");
        let written: serde_json::Value =
            serde_json::from_slice(&request.to_body()).expect("valid JSON");
        let mut expected: serde_json::Value = serde_json::from_slice(body).expect("json");
        expected["model"] = "b".into();
        assert_eq!(written, expected);
    }

    #[test]
    fn max_completion_tokens_wins_over_max_tokens() {
        let request = ChatRequest::parse(
            br#"{"model":"m","max_tokens":5,"max_completion_tokens":9,"messages":[{"role":"user","content":"x"}]}"#,
        )
        .expect("valid");
        assert_eq!(request.completion_cap, Some(9));
    }

    #[test]
    fn rewrites_only_what_changed() {
        let body = br#"{"model":"alias","messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"image_url","image_url":{"detail":"high","url":"https://x/a.png"},"x":1}]}],"stream":true,"stream_options":{"other":2}}"#;
        let mut request = ChatRequest::parse(body).expect("valid");
        request.set_model("real-model");
        request.request_stream_usage();
        for (param, image) in request.images_mut() {
            assert_eq!(param, "messages[1].content[0].image_url.url");
            image.set_url("data:image/png;base64,AAAA".into());
            image.strip_detail();
        }
        let written = String::from_utf8(request.to_body()).expect("utf8");
        assert_eq!(
            written,
            r#"{"model":"real-model","messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"},"x":1}]}],"stream":true,"stream_options":{"other":2,"include_usage":true}}"#
        );
    }

    #[test]
    fn shared_and_owned_urls_are_written_as_json_strings() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://x/a.png"}},{"type":"image_url","image_url":{"url":"https://x/b.png","detail":"low"}}]}]}"#;
        let mut request = ChatRequest::parse(body).expect("valid");
        let shared = Arc::new("data:image/png;base64,iVBORw0KGgo=".to_owned());
        let mut params = Vec::new();
        for (i, (param, image)) in request.images_mut().enumerate() {
            params.push(param);
            if i == 0 {
                image.set_url_shared(Arc::clone(&shared));
            } else {
                image.set_url("needs \"escaping\"".into());
            }
        }
        assert_eq!(
            params,
            [
                "messages[0].content[0].image_url.url",
                "messages[0].content[1].image_url.url"
            ]
        );
        let with_params: Vec<_> = request
            .images_with_params()
            .map(|(param, image)| (param, image.url.to_string()))
            .collect();
        assert_eq!(with_params[0].1, *shared);
        assert!(
            request
                .images()
                .next()
                .is_some_and(|i| i.url == shared.as_str())
        );
        let written: serde_json::Value =
            serde_json::from_slice(&request.to_body()).expect("valid JSON");
        assert_eq!(
            written["messages"][0]["content"][0]["image_url"]["url"],
            *shared
        );
        assert_eq!(
            written["messages"][0]["content"][1]["image_url"],
            serde_json::json!({"url": "needs \"escaping\"", "detail": "low"})
        );
    }

    #[test]
    fn bad_requests_name_their_param() {
        assert_eq!(parse_err("not json").0, "invalid_request");
        assert_eq!(parse_err("[1]").0, "invalid_request");
        assert_eq!(parse_err(r#"{"messages":[]}"#).1.as_deref(), Some("model"));
        assert_eq!(
            parse_err(r#"{"model":3,"messages":[]}"#).1.as_deref(),
            Some("model")
        );
        assert_eq!(parse_err(r#"{"model":"m"}"#).1.as_deref(), Some("messages"));
        assert_eq!(
            parse_err(r#"{"model":"m","messages":{}}"#).1.as_deref(),
            Some("messages")
        );
        assert_eq!(
            parse_err(r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":5}}]}]}"#)
                .1
                .as_deref(),
            Some("messages[0].content[0].image_url.url")
        );
        assert_eq!(
            parse_err(
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":5}]}]}"#
            )
            .1
            .as_deref(),
            Some("messages[0].content[0].text")
        );
        assert_eq!(
            parse_err(
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#
            )
            .1
            .as_deref(),
            Some("messages[0].content[0].image_url")
        );
        assert_eq!(
            parse_err(r#"{"model":"m","messages":[1]}"#).1.as_deref(),
            Some("messages[0]")
        );
        assert_eq!(
            parse_err(r#"{"model":"m","messages":[{"content":{}}]}"#)
                .1
                .as_deref(),
            Some("messages[0].content")
        );
        assert_eq!(
            parse_err(r#"{"model":"m","messages":[{"content":"x"}],"max_tokens":-1}"#)
                .1
                .as_deref(),
            Some("max_tokens")
        );
    }

    #[test]
    fn deep_nesting_is_refused_without_overflowing_the_stack() {
        let depth = 200_000;
        let body = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}],"x":{}{}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        assert_eq!(parse_err(&body).0, "invalid_request");
    }
}
