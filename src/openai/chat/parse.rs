//! Parsing a chat completion request in one serde pass through nested
//! seeds: `messages` and their content parts are parsed (strings borrowed
//! from the body, so a large data URI is read once and never copied), every
//! other field is kept raw. A field of the wrong kind fails with the
//! client-facing error and its `param`.

use std::borrow::Cow;
use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::{
    ChatRequest, Content, ImagePart, ImageUrl, Message, Part, PartKind, RequestError, UrlText,
};
use crate::openai::raw::{self, Claim, RawObject};

/// Deeper JSON is refused: serde_json's own default recursion limit.
const MAX_NESTING: usize = 128;

fn invalid(param: impl Into<String>, message: impl Into<String>) -> RequestError {
    RequestError::at(param, message)
}

impl<'a> ChatRequest<'a> {
    /// Parses a request body, refusing what is not a chat completion request
    /// with `invalid_request` and the offending `param`.
    pub fn parse(body: &'a [u8]) -> Result<Self, RequestError> {
        if raw::nests_deeper_than(body, MAX_NESTING) {
            return Err(RequestError::new(format!(
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
                    RequestError::new(format!("The request body is not a valid JSON object: {e}."))
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
}

fn cap(object: &RawObject<'_>, key: &str) -> Result<Option<u64>, RequestError> {
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
struct ShapeError(RefCell<Option<RequestError>>);

impl ShapeError {
    fn fail<E: de::Error>(&self, param: String, message: &str) -> E {
        self.0
            .borrow_mut()
            .get_or_insert_with(|| invalid(param, message));
        E::custom(message)
    }

    fn take(&self) -> Option<RequestError> {
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
