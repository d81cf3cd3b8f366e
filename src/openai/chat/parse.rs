//! Parsing a chat completion request in one serde pass through nested
//! seeds: `messages` and their content parts are parsed (strings borrowed
//! from the body, so a large data URI is read once and never copied), the
//! other fields Iris interprets are read raw, and every field it does not
//! interpret stays in runs of the body's text. A field of the wrong kind, a
//! field Iris interprets given twice, or more messages or content parts
//! than the limits fail with the client-facing error and its `param`.
//!
//! What a parse allocates is bounded by what Iris reads: a message, a
//! content part and each interpreted field cost a few dozen bytes, the
//! limits bound how many there are, and everything else is a slice of the
//! body.

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::{
    ChatRequest, Content, ImagePart, ImageUrl, Message, Part, PartKind, RequestError,
    RequestLimits, UrlText, urls,
};
use crate::openai::raw::{self, Claim, Interpreted, RawObject};

/// Deeper JSON is refused: serde_json's own default recursion limit.
const MAX_NESTING: usize = 128;

/// OpenAI's range for `n`, the number of choices.
pub const MAX_CHOICES: u64 = 128;

/// The top-level fields Iris reads: the model and stream flags, the caps and
/// `n` the reservation is made of, the messages, the definitions the prompt
/// estimate counts, and `user`, which the response cache's key leaves out.
/// Each may appear once.
const REQUEST_FIELDS: Interpreted = Interpreted(&[
    "model",
    "messages",
    "stream",
    "stream_options",
    "n",
    "max_tokens",
    "max_completion_tokens",
    "tools",
    "functions",
    "response_format",
    "user",
]);
/// A message's fields the estimate counts, and its content.
const MESSAGE_FIELDS: Interpreted = Interpreted(&[
    "content",
    "role",
    "name",
    "tool_calls",
    "function_call",
    "tool_call_id",
]);
const PART_FIELDS: Interpreted = Interpreted(&["type", "text", "image_url"]);
const IMAGE_FIELDS: Interpreted = Interpreted(&["url", "detail"]);
pub(super) const STREAM_OPTIONS_FIELDS: Interpreted = Interpreted(&["include_usage"]);

fn invalid(param: impl Into<String>, message: impl Into<String>) -> RequestError {
    RequestError::at(param, message)
}

impl<'a> ChatRequest<'a> {
    /// Parses a request body under the default [`RequestLimits`].
    pub fn parse(body: &'a [u8]) -> Result<Self, RequestError> {
        Self::parse_within(body, RequestLimits::DEFAULT)
    }

    /// Parses a request body, refusing what is not a chat completion request
    /// (or exceeds `limits`) with `invalid_request` and the offending `param`.
    pub fn parse_within(body: &'a [u8], limits: RequestLimits) -> Result<Self, RequestError> {
        if raw::nests_deeper_than(body, MAX_NESTING) {
            return Err(RequestError::new(format!(
                "The request body nests arrays and objects deeper than {MAX_NESTING} levels."
            )));
        }
        let parse = Parse {
            body,
            limits,
            parts: Cell::new(0),
            error: RefCell::default(),
        };
        let text = std::str::from_utf8(body).map_err(RequestError::not_utf8)?;
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let parsed = TopLevelSeed(&parse)
            .deserialize(&mut deserializer)
            .and_then(|top| deserializer.end().map(|()| top));
        let (object, messages) = match parsed {
            Ok(top) => top,
            Err(e) => {
                return Err(parse.error.take().unwrap_or_else(|| {
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

        let stream = match object.get("stream").map(RawValue::get) {
            None | Some("false" | "null") => false,
            Some("true") => true,
            Some(_) => return Err(invalid("stream", "'stream' must be a boolean.")),
        };

        let include_usage = match object.get("stream_options") {
            None => false,
            Some(raw) if raw.get() == "null" => false,
            Some(raw) => {
                let options =
                    RawObject::parse(raw.get(), STREAM_OPTIONS_FIELDS).ok_or_else(|| {
                        invalid(
                            "stream_options",
                            "'stream_options' must be an object, each of its fields given once \
                             and in its own case ('include_usage').",
                        )
                    })?;
                match options.get("include_usage").map(RawValue::get) {
                    None | Some("false" | "null") => false,
                    Some("true") => true,
                    Some(_) => {
                        return Err(invalid(
                            "stream_options.include_usage",
                            "'stream_options.include_usage' must be a boolean.",
                        ));
                    }
                }
            }
        };

        let choices = match object.get("n") {
            None => 1,
            Some(raw) if raw.get() == "null" => 1,
            Some(raw) => raw
                .get()
                .parse::<u64>()
                .ok()
                .filter(|n| (1..=MAX_CHOICES).contains(n))
                .ok_or_else(|| {
                    invalid(
                        "n",
                        format!("'n' must be an integer from 1 to {MAX_CHOICES}."),
                    )
                })?,
        };

        // Both caps may reach an upstream that reads either: the larger is
        // what it may generate, so the larger is reserved.
        let completion_cap = match (
            cap(&object, "max_completion_tokens")?,
            cap(&object, "max_tokens")?,
        ) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
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
            choices,
            messages,
            messages_changed: false,
            body_changed: false,
            body_len: body.len(),
        })
    }
}

/// A completion cap: a positive integer, or null for none.
fn cap(object: &RawObject<'_>, key: &str) -> Result<Option<u64>, RequestError> {
    match object.get(key) {
        None => Ok(None),
        Some(raw) if raw.get() == "null" => Ok(None),
        Some(raw) => raw
            .get()
            .parse::<u64>()
            .ok()
            .filter(|&cap| cap >= 1)
            .map(Some)
            .ok_or_else(|| invalid(key, format!("'{key}' must be a positive integer."))),
    }
}

/// What one parse's seeds share: the body (the runs of fields Iris does not
/// interpret are slices of it), the limits and the content parts counted so
/// far, and the first request-shape error met, with its `param`. A seed
/// that finds a field of the wrong kind records the client-facing error
/// here and aborts the pass.
struct Parse<'de> {
    body: &'de [u8],
    limits: RequestLimits,
    parts: Cell<usize>,
    error: RefCell<Option<RequestError>>,
}

impl Parse<'_> {
    fn fail<E: de::Error>(&self, param: String, message: &str) -> E {
        self.error
            .borrow_mut()
            .get_or_insert_with(|| invalid(param, message));
        E::custom(message)
    }

    /// The error for an interpreted field given twice in the object at
    /// `at`: `key` as given, the second time, or in another case than
    /// `field`'s.
    fn repeated<E: de::Error>(&self, at: &str, key: &str, field: &str) -> E {
        let param = if at.is_empty() {
            key.to_owned()
        } else {
            format!("{at}.{key}")
        };
        let message = crate::openai::raw::repeated_message(&param, key, field);
        self.fail(param, &message)
    }

    /// Reads a content part's field that Iris does not interpret, refusing a
    /// URL in it (see [`urls`]).
    fn inspect<'de, A: MapAccess<'de>>(
        &self,
        map: &mut A,
        at: &str,
        key: &str,
    ) -> Result<Claim<'de>, A::Error> {
        let raw: &'de RawValue = map.next_value()?;
        match urls::find(raw) {
            None => Ok(Claim::Inspected(raw)),
            Some(path) => Err(self.fail(
                format!("{at}.{key}{path}"),
                "Iris fetches URLs only as an 'image_url' part's 'url'; a URL anywhere else in a content part is not forwarded. Send the image as an image_url part.",
            )),
        }
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

/// The top-level object: `messages` parsed, the other interpreted fields
/// read raw, the rest left in the body.
struct TopLevelSeed<'p, 'de>(&'p Parse<'de>);

type TopLevel<'a> = (RawObject<'a>, Option<Vec<Message<'a>>>);

impl<'de> DeserializeSeed<'de> for TopLevelSeed<'_, 'de> {
    type Value = TopLevel<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for TopLevelSeed<'_, 'de> {
    type Value = TopLevel<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a chat completion request object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let parse = self.0;
        let mut messages = None;
        let object = RawObject::from_map(
            parse.body,
            &mut map,
            REQUEST_FIELDS,
            |key, field| parse.repeated("", key, field),
            |key, map| match key {
                "messages" => {
                    messages = Some(map.next_value_seed(MessagesSeed(parse))?);
                    Ok(Claim::Parsed)
                }
                _ if REQUEST_FIELDS.0.contains(&key) => Ok(Claim::Peeked(map.next_value()?)),
                _ => Ok(Claim::Raw),
            },
        )?;
        Ok((object, messages))
    }
}

struct MessagesSeed<'p, 'de>(&'p Parse<'de>);

impl<'de> DeserializeSeed<'de> for MessagesSeed<'_, 'de> {
    type Value = Vec<Message<'de>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for MessagesSeed<'_, 'de> {
    type Value = Vec<Message<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of messages")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        // No capacity from the body's claims: it grows with what is parsed.
        let mut messages = Vec::new();
        while let Some(message) = seq.next_element_seed(MessageSeed(self.0, messages.len()))? {
            messages.push(message);
        }
        Ok(messages)
    }

    refuse_kinds!(|s: &Self| s.0, |_: &Self| "messages".to_owned(),
        "'messages' must be an array of message objects."; map, str, unit, scalars);
}

/// Message `.1` of the request.
struct MessageSeed<'p, 'de>(&'p Parse<'de>, usize);

impl<'de> DeserializeSeed<'de> for MessageSeed<'_, 'de> {
    type Value = Message<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        let max = self.0.limits.max_messages;
        if self.1 >= max {
            // Refused before the message is read.
            return Err(self.0.fail(
                "messages".to_owned(),
                &format!("'messages' holds more than {max} messages, the most this gateway takes in one request."),
            ));
        }
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for MessageSeed<'_, 'de> {
    type Value = Message<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a message object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (parse, index) = (self.0, self.1);
        let mut content = Content::Absent;
        let fields = RawObject::from_map(
            parse.body,
            &mut map,
            MESSAGE_FIELDS,
            |key, field| parse.repeated(&format!("messages[{index}]"), key, field),
            |key, map| match key {
                "content" => {
                    content = map.next_value_seed(ContentSeed(parse, index))?;
                    Ok(Claim::Parsed)
                }
                _ if MESSAGE_FIELDS.0.contains(&key) => Ok(Claim::Peeked(map.next_value()?)),
                _ => Ok(Claim::Raw),
            },
        )?;
        Ok(Message { fields, content })
    }

    refuse_kinds!(|s: &Self| s.0, |s: &Self| format!("messages[{}]", s.1),
        "Each message must be an object."; seq, str, unit, scalars);
}

/// The `content` of message `.1`.
struct ContentSeed<'p, 'de>(&'p Parse<'de>, usize);

impl<'de> DeserializeSeed<'de> for ContentSeed<'_, 'de> {
    type Value = Content<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ContentSeed<'_, 'de> {
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
        let mut parts = Vec::new();
        while let Some(part) = seq.next_element_seed(PartSeed(self.0, self.1, parts.len()))? {
            parts.push(part);
        }
        Ok(Content::Parts(parts))
    }

    refuse_kinds!(|s: &Self| s.0, |s: &Self| format!("messages[{}].content", s.1),
        "'content' must be a string or an array of content parts."; map, scalars);
}

/// Content part `.2` of message `.1`.
struct PartSeed<'p, 'de>(&'p Parse<'de>, usize, usize);

impl PartSeed<'_, '_> {
    fn at(&self) -> String {
        format!("messages[{}].content[{}]", self.1, self.2)
    }
}

impl<'de> DeserializeSeed<'de> for PartSeed<'_, 'de> {
    type Value = Part<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        let (counted, max) = (self.0.parts.get(), self.0.limits.max_content_parts);
        if counted >= max {
            return Err(self.0.fail(
                format!("messages[{}].content", self.1),
                &format!("The messages hold more than {max} content parts, the most this gateway takes in one request."),
            ));
        }
        self.0.parts.set(counted + 1);
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for PartSeed<'_, 'de> {
    type Value = Part<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a content part object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let parse = self.0;
        let at = self.at();
        let mut part_type = None;
        let mut text = None;
        let mut image = None;
        let fields = RawObject::from_map(
            parse.body,
            &mut map,
            PART_FIELDS,
            |key, field| parse.repeated(&at, key, field),
            |key, map| match key {
                "type" => {
                    let raw: &'de RawValue = map.next_value()?;
                    part_type = Some(raw::as_str(raw).ok_or_else(|| {
                        parse.fail::<A::Error>(format!("{at}.type"), "'type' must be a string.")
                    })?);
                    Ok(Claim::Peeked(raw))
                }
                "text" => {
                    let raw: &'de RawValue = map.next_value()?;
                    text = Some(raw);
                    Ok(Claim::Peeked(raw))
                }
                "image_url" => {
                    image = Some(map.next_value_seed(ImageSeed(parse, &at))?);
                    Ok(Claim::Parsed)
                }
                _ => parse.inspect(map, &at, key),
            },
        )?;
        let kind = match part_type.as_deref() {
            Some("text") => PartKind::Text(text.and_then(raw::as_str).ok_or_else(|| {
                parse.fail::<A::Error>(format!("{at}.text"), "A text part needs a string 'text'.")
            })?),
            Some("image_url") => PartKind::Image(image.take().ok_or_else(|| {
                parse.fail::<A::Error>(
                    format!("{at}.image_url"),
                    "An image_url part needs an 'image_url' object.",
                )
            })?),
            _ => PartKind::Other,
        };
        // An image elsewhere than in an image_url part would reach the
        // upstream unchecked, not inlined and not counted.
        if image.is_some() {
            return Err(parse.fail(
                format!("{at}.image_url"),
                "Only a part of type 'image_url' may carry an 'image_url'.",
            ));
        }
        Ok(Part { fields, kind })
    }

    refuse_kinds!(|s: &Self| s.0, |s: &Self| s.at(),
        "Each content part must be an object."; seq, str, unit, scalars);
}

/// The `image_url` object of the part at `.1`: `url` parsed (borrowed from
/// the body, so a large data URI is read once and never copied), `detail`
/// read, everything else left in the body.
struct ImageSeed<'p, 'de>(&'p Parse<'de>, &'p str);

impl<'de> DeserializeSeed<'de> for ImageSeed<'_, 'de> {
    type Value = ImagePart<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ImageSeed<'_, 'de> {
    type Value = ImagePart<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an image_url object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (parse, at) = (self.0, self.1);
        let image_at = format!("{at}.image_url");
        let mut url = None;
        let mut detail = None;
        let fields = RawObject::from_map(
            parse.body,
            &mut map,
            IMAGE_FIELDS,
            |key, field| parse.repeated(&image_at, key, field),
            |key, map| match key {
                "url" => {
                    url = Some(map.next_value_seed(UrlSeed(parse, at))?);
                    Ok(Claim::Parsed)
                }
                "detail" => {
                    let raw: &'de RawValue = map.next_value()?;
                    detail = match raw::kind(raw) {
                        "null" => None,
                        _ => Some(raw::as_str(raw).ok_or_else(|| {
                            parse.fail::<A::Error>(
                                format!("{image_at}.detail"),
                                "'detail' must be a string.",
                            )
                        })?),
                    };
                    Ok(Claim::Peeked(raw))
                }
                _ => parse.inspect(map, &image_at, key),
            },
        )?;
        let url = url.ok_or_else(|| {
            parse.fail::<A::Error>(
                format!("{image_at}.url"),
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
struct UrlSeed<'p, 'de>(&'p Parse<'de>, &'p str);

impl<'de> DeserializeSeed<'de> for UrlSeed<'_, 'de> {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for UrlSeed<'_, 'de> {
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
