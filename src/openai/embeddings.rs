//! An embeddings request (`POST /v1/embeddings`), as Iris looks inside it:
//! `model`, which it routes on (and renames for a deployment), and `input`,
//! whose shape it checks and whose size it reserves. Every other field
//! (`encoding_format`, `dimensions`, `user`, a provider's own) stays in runs
//! of the body's text and goes upstream byte for byte.
//!
//! `input` is walked, never collected: an array of a million short strings
//! costs what the walk holds (one string at a time), not a million entries.

use std::borrow::Cow;
use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::chat::RequestError;
use super::raw::{self, Claim, Interpreted, RawObject};

/// The fields Iris reads; each may appear once (`user`, which does not
/// change an answer, is left out of the response cache's key).
const FIELDS: Interpreted = Interpreted(&["model", "input", "user"]);

/// Deeper JSON is refused, as for a chat completion.
const MAX_NESTING: usize = 128;

/// A parsed embeddings request, borrowing from the body.
#[derive(Debug)]
pub struct EmbeddingsRequest<'a> {
    body: RawObject<'a>,
    pub model: Cow<'a, str>,
    /// `input`, checked to be one of the shapes OpenAI takes.
    input: &'a RawValue,
    changed: bool,
    body_len: usize,
}

/// One item of `input`, as the walk meets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputItem<'s> {
    /// A text to embed.
    Text(&'s str),
    /// An array of token ids, already tokens: its length.
    Tokens(u64),
}

const INPUT_SHAPE: &str = "'input' must be a non-empty string, a non-empty array of non-empty \
    strings, an array of token ids, or a non-empty array of non-empty arrays of token ids.";

fn input_error() -> RequestError {
    RequestError::at("input", INPUT_SHAPE)
}

impl<'a> EmbeddingsRequest<'a> {
    /// Parses a request body, refusing what is not an embeddings request
    /// with `invalid_request` and the offending `param`.
    pub fn parse(body: &'a [u8]) -> Result<Self, RequestError> {
        if raw::nests_deeper_than(body, MAX_NESTING) {
            return Err(RequestError::new(format!(
                "The request body nests arrays and objects deeper than {MAX_NESTING} levels."
            )));
        }
        let repeated = RefCell::new(None);
        let text = std::str::from_utf8(body).map_err(RequestError::not_utf8)?;
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let parsed = TopLevel {
            body,
            repeated: &repeated,
        }
        .deserialize(&mut deserializer)
        .and_then(|object| deserializer.end().map(|()| object));
        let object = match parsed {
            Ok(object) => object,
            Err(e) => {
                return Err(match repeated.take() {
                    Some((key, field)) => {
                        let message = raw::repeated_message(&key, &key, &field);
                        RequestError::at(key, message)
                    }
                    None => RequestError::new(format!(
                        "The request body is not a valid JSON object: {e}."
                    )),
                });
            }
        };
        let model = match object.get_borrowed("model") {
            None => {
                return Err(RequestError::at(
                    "model",
                    "Missing required parameter: 'model'.",
                ));
            }
            Some(raw) => raw::as_str(raw)
                .filter(|m| !m.is_empty())
                .ok_or_else(|| RequestError::at("model", "'model' must be a non-empty string."))?,
        };
        let Some(input) = object.get_borrowed("input") else {
            return Err(RequestError::at(
                "input",
                "Missing required parameter: 'input'.",
            ));
        };
        walk_input(input, |_| {})?;
        Ok(Self {
            body: object,
            model,
            input,
            changed: false,
            body_len: body.len(),
        })
    }

    /// Calls `each` with every item of `input`, in order.
    pub fn each_input(&self, each: impl FnMut(InputItem<'_>)) {
        // The shape was checked when the request was parsed.
        let _ = walk_input(self.input, each);
    }

    /// Sends `name` upstream as the model.
    pub fn set_model(&mut self, name: &str) {
        self.body.replace("model", raw::raw_string(name));
        self.changed = true;
    }

    /// Whether the body must be written again ([`Self::to_body`]) rather
    /// than sent as received.
    pub fn changed(&self) -> bool {
        self.changed
    }

    /// The request as the response cache keys it: without `user`, which
    /// does not change the vectors.
    pub fn to_cache_text(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.body_len);
        self.body.write_without(&mut out, &["user"], |_, _| false);
        out
    }

    /// The request as it goes upstream.
    pub fn to_body(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.body_len + 64);
        self.body.write(&mut out);
        out
    }
}

/// The top-level object: `model` and `input` peeked, each at most once (the
/// repeated one is noted in `repeated`), the rest kept as runs.
struct TopLevel<'b, 'a> {
    body: &'a [u8],
    repeated: &'b RefCell<Option<(String, String)>>,
}

impl<'de> DeserializeSeed<'de> for TopLevel<'_, 'de> {
    type Value = RawObject<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for TopLevel<'_, 'de> {
    type Value = RawObject<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let repeated = self.repeated;
        RawObject::from_map(
            self.body,
            &mut map,
            FIELDS,
            |key, field| {
                *repeated.borrow_mut() = Some((key.to_owned(), field.to_owned()));
                de::Error::custom(format_args!("`{key}` repeated"))
            },
            |key, map| {
                if FIELDS.0.contains(&key) {
                    Ok(Claim::Peeked(map.next_value()?))
                } else {
                    Ok(Claim::Raw)
                }
            },
        )
    }
}

/// Walks `input`, checking its shape: a string, an array of strings, an
/// array of token ids (one input), or an array of arrays of token ids; none
/// of them empty. Every item goes to `each`.
fn walk_input(input: &RawValue, each: impl FnMut(InputItem<'_>)) -> Result<(), RequestError> {
    let each = RefCell::new(each);
    let mut deserializer = serde_json::Deserializer::from_str(input.get());
    deserializer
        .deserialize_any(InputVisitor { each: &each })
        .map_err(|_| input_error())
}

struct InputVisitor<'f, F> {
    each: &'f RefCell<F>,
}

/// What the array's first element made of it; the others must agree.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ArrayOf {
    Texts,
    TokenIds,
    TokenArrays,
}

impl<'de, F: FnMut(InputItem<'_>)> Visitor<'de> for InputVisitor<'_, F> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(INPUT_SHAPE)
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<(), E> {
        if text.is_empty() {
            return Err(E::custom("empty"));
        }
        (self.each.borrow_mut())(InputItem::Text(text));
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut kind = None;
        let mut token_ids = 0u64;
        while let Some(element) = seq.next_element_seed(ElementSeed { each: self.each })? {
            let this = match element {
                Element::Text => ArrayOf::Texts,
                Element::TokenId => ArrayOf::TokenIds,
                Element::TokenArray => ArrayOf::TokenArrays,
            };
            if *kind.get_or_insert(this) != this {
                return Err(de::Error::custom("mixed"));
            }
            if this == ArrayOf::TokenIds {
                token_ids += 1;
            }
        }
        match kind {
            None => Err(de::Error::custom("empty")),
            Some(ArrayOf::TokenIds) => {
                (self.each.borrow_mut())(InputItem::Tokens(token_ids));
                Ok(())
            }
            Some(_) => Ok(()),
        }
    }
}

/// What an element of the `input` array was.
enum Element {
    Text,
    TokenId,
    TokenArray,
}

struct ElementSeed<'f, F> {
    each: &'f RefCell<F>,
}

impl<'de, F: FnMut(InputItem<'_>)> DeserializeSeed<'de> for ElementSeed<'_, F> {
    type Value = Element;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Element, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, F: FnMut(InputItem<'_>)> Visitor<'de> for ElementSeed<'_, F> {
    type Value = Element;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string, a token id, or an array of token ids")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Element, E> {
        if text.is_empty() {
            return Err(E::custom("empty"));
        }
        (self.each.borrow_mut())(InputItem::Text(text));
        Ok(Element::Text)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Element, E> {
        Ok(Element::TokenId)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Element, A::Error> {
        let mut tokens = 0u64;
        while seq.next_element::<TokenId>()?.is_some() {
            tokens += 1;
        }
        if tokens == 0 {
            return Err(de::Error::custom("empty"));
        }
        (self.each.borrow_mut())(InputItem::Tokens(tokens));
        Ok(Element::TokenArray)
    }
}

/// A token id: a non-negative integer, nothing kept of it.
struct TokenId;

impl<'de> de::Deserialize<'de> for TokenId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Id;
        impl Visitor<'_> for Id {
            type Value = TokenId;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a token id")
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<TokenId, E> {
                Ok(TokenId)
            }
        }
        d.deserialize_any(Id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(body: &str) -> Result<Vec<String>, RequestError> {
        let request = EmbeddingsRequest::parse(body.as_bytes())?;
        let mut seen = Vec::new();
        request.each_input(|item| {
            seen.push(match item {
                InputItem::Text(text) => format!("text:{text}"),
                InputItem::Tokens(n) => format!("tokens:{n}"),
            })
        });
        Ok(seen)
    }

    #[test]
    fn a_body_that_is_not_utf8_is_refused() {
        let body = b"{\"model\":\"e\",\"input\":\"a\",\"user\":\"\xff\"}";
        let error = EmbeddingsRequest::parse(body).expect_err("not UTF-8");
        assert_eq!(error.param, None);
        assert!(error.message.contains("not UTF-8"), "{}", error.message);
    }

    #[test]
    fn every_shape_openai_takes_is_walked() {
        assert_eq!(
            items(r#"{"model":"e","input":"hello"}"#).unwrap(),
            ["text:hello"]
        );
        assert_eq!(
            items(r#"{"model":"e","input":["a","b\n"]}"#).unwrap(),
            ["text:a", "text:b\n"]
        );
        assert_eq!(
            items(r#"{"model":"e","input":[1,2,3]}"#).unwrap(),
            ["tokens:3"]
        );
        assert_eq!(
            items(r#"{"model":"e","input":[[1,2],[3]]}"#).unwrap(),
            ["tokens:2", "tokens:1"]
        );
    }

    #[test]
    fn other_shapes_are_refused_at_input() {
        for body in [
            r#"{"model":"e","input":42}"#,
            r#"{"model":"e","input":null}"#,
            r#"{"model":"e","input":{"text":"a"}}"#,
            r#"{"model":"e","input":[]}"#,
            r#"{"model":"e","input":""}"#,
            r#"{"model":"e","input":["a",""]}"#,
            r#"{"model":"e","input":["a",1]}"#,
            r#"{"model":"e","input":[[1],"a"]}"#,
            r#"{"model":"e","input":[[]]}"#,
            r#"{"model":"e","input":[[1,-2]]}"#,
            r#"{"model":"e","input":[1.5]}"#,
            r#"{"model":"e","input":[["a"]]}"#,
            r#"{"model":"e","input":[true]}"#,
            r#"{"model":"e"}"#,
        ] {
            let error = EmbeddingsRequest::parse(body.as_bytes()).unwrap_err();
            assert_eq!(error.param.as_deref(), Some("input"), "{body}");
        }
    }

    #[test]
    fn model_is_checked_and_fields_are_taken_once() {
        let error = EmbeddingsRequest::parse(br#"{"input":"a"}"#).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("model"));
        let error = EmbeddingsRequest::parse(br#"{"model":1,"input":"a"}"#).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("model"));
        let error =
            EmbeddingsRequest::parse(br#"{"model":"e","input":"a","model":"f"}"#).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("model"));
        let error =
            EmbeddingsRequest::parse(br#"{"model":"e","input":"a","input":[1]}"#).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("input"));
        let error = EmbeddingsRequest::parse(br#"{"model":"e","input":"a","user":"x","user":"y"}"#)
            .unwrap_err();
        assert_eq!(error.param.as_deref(), Some("user"));
        // A name that differs from one Iris reads only in case (Go's
        // `encoding/json` would read it as that field).
        let error =
            EmbeddingsRequest::parse(br#"{"model":"e","Input":"a","input":"b"}"#).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("Input"));
        assert!(error.message.contains("only in case"), "{}", error.message);
        let error = EmbeddingsRequest::parse(b"[1]").unwrap_err();
        assert_eq!(error.param, None);
    }

    #[test]
    fn the_cache_text_leaves_out_only_the_user() {
        let a =
            EmbeddingsRequest::parse(br#"{"model":"e","user":"u1","input":["a"],"dimensions":8}"#)
                .unwrap();
        let b =
            EmbeddingsRequest::parse(br#"{"model":"e","input":["a"],"dimensions":8,"user":"u2"}"#)
                .unwrap();
        assert_eq!(a.to_cache_text(), b.to_cache_text());
        let c =
            EmbeddingsRequest::parse(br#"{"model":"e","input":["a"],"dimensions":16}"#).unwrap();
        assert_ne!(a.to_cache_text(), c.to_cache_text());
    }

    #[test]
    fn other_fields_go_upstream_as_sent_and_the_model_is_renamed_in_place() {
        let body = br#"{"model":"e","input":["a"],"encoding_format":"base64", "dimensions" : 8}"#;
        let mut request = EmbeddingsRequest::parse(body).unwrap();
        assert!(!request.changed());
        request.set_model("text-embedding-3-small");
        assert_eq!(
            String::from_utf8(request.to_body()).unwrap(),
            r#"{"model":"text-embedding-3-small","input":["a"],"encoding_format":"base64", "dimensions" : 8}"#
        );
    }
}
