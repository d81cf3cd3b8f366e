//! A JSON object kept as its raw field texts, so that Iris can read and replace
//! the few fields it cares about and write every other field back byte for byte
//! (unknown fields included) without parsing or re-serializing them.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// One field's value: borrowed from the request body, written by Iris, or
/// parsed into a structure that its owner writes back (see
/// [`RawObject::from_map`]).
#[derive(Debug)]
enum Field<'a> {
    Borrowed(&'a RawValue),
    Owned(Box<RawValue>),
    Parsed,
}

impl Field<'_> {
    fn raw(&self) -> Option<&RawValue> {
        match self {
            Field::Borrowed(raw) => Some(raw),
            Field::Owned(raw) => Some(raw),
            Field::Parsed => None,
        }
    }
}

/// What [`RawObject::from_map`]'s caller did with a field's value.
pub enum Claim<'a> {
    /// Nothing: keep it raw.
    Raw,
    /// Read it raw to look at it: keep that raw text.
    Peeked(&'a RawValue),
    /// Parsed it into a structure of the caller's, which writes it back.
    Parsed,
}

/// A JSON object as an ordered list of `(key, raw value)`.
#[derive(Debug, Default)]
pub struct RawObject<'a> {
    fields: Vec<(String, Field<'a>)>,
}

impl<'a> RawObject<'a> {
    /// The value of `key`; the last one wins if a key repeats, as in most JSON parsers.
    pub fn get(&self, key: &str) -> Option<&RawValue> {
        self.fields
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.raw())
    }

    /// The value of `key` as borrowed from the body, so it may outlive `self`.
    pub fn get_borrowed(&self, key: &str) -> Option<&'a RawValue> {
        match self.fields.iter().rev().find(|(k, _)| k == key) {
            Some((_, Field::Borrowed(raw))) => Some(raw),
            _ => None,
        }
    }

    /// Replaces `key` (every occurrence) or appends it.
    pub fn set(&mut self, key: &str, value: Box<RawValue>) {
        self.remove(key);
        self.fields.push((key.to_owned(), Field::Owned(value)));
    }

    /// Replaces `key` in place, keeping its position, or appends it.
    pub fn replace(&mut self, key: &str, value: Box<RawValue>) {
        if let Some(position) = self.fields.iter().rposition(|(k, _)| k == key) {
            self.fields[position].1 = Field::Owned(value);
            let mut index = 0;
            self.fields.retain(|(k, _)| {
                index += 1;
                k != key || index - 1 == position
            });
        } else {
            self.fields.push((key.to_owned(), Field::Owned(value)));
        }
    }

    pub fn remove(&mut self, key: &str) -> bool {
        let before = self.fields.len();
        self.fields.retain(|(k, _)| k != key);
        self.fields.len() != before
    }

    /// Reads a JSON object's fields in one pass. `claim(key, map)` says what
    /// becomes of each value (see [`Claim`]); unclaimed values stay raw.
    pub fn from_map<A: MapAccess<'a>>(
        map: &mut A,
        mut claim: impl FnMut(&str, &mut A) -> Result<Claim<'a>, A::Error>,
    ) -> Result<Self, A::Error> {
        let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(8));
        while let Some(key) = map.next_key::<String>()? {
            let field = match claim(&key, map)? {
                Claim::Raw => Field::Borrowed(map.next_value()?),
                Claim::Peeked(raw) => Field::Borrowed(raw),
                Claim::Parsed => Field::Parsed,
            };
            fields.push((key, field));
        }
        Ok(RawObject { fields })
    }

    /// Writes the object; `override_field` writes the text of each parsed
    /// field (returning whether it did). Raw fields are written as they are,
    /// even beside a parsed field of the same name (a repeated key).
    pub fn write_with(
        &self,
        out: &mut Vec<u8>,
        mut override_field: impl FnMut(&str, &mut Vec<u8>) -> bool,
    ) {
        out.push(b'{');
        for (i, (key, value)) in self.fields.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_json_string(out, key);
            out.push(b':');
            let parsed = matches!(value, Field::Parsed);
            if !(parsed && override_field(key, out)) {
                let raw = value.raw().map_or("null", RawValue::get);
                out.extend_from_slice(raw.as_bytes());
            }
        }
        out.push(b'}');
    }

    pub fn write(&self, out: &mut Vec<u8>) {
        self.write_with(out, |_, _| false);
    }
}

impl<'de> Deserialize<'de> for RawObject<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;

        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = RawObject<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                RawObject::from_map(&mut map, |_, _| Ok(Claim::Raw))
            }
        }

        deserializer.deserialize_map(ObjectVisitor)
    }
}

/// Whether `json` nests arrays and objects deeper than `max`.
///
/// Iris itself never recurses over fields it passes through (they stay raw),
/// but an upstream parser might: absurd nesting is refused up front. Strings
/// are skipped with `memchr`, so a large base64 image costs microseconds.
pub fn nests_deeper_than(json: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut i = 0;
    while i < json.len() {
        match json[i] {
            b'"' => {
                // Skip to the closing quote, past escaped characters.
                i += 1;
                loop {
                    // An escape as the last byte steps past the end: unterminated.
                    let Some(rest) = json.get(i..) else {
                        return false;
                    };
                    match memchr::memchr2(b'"', b'\\', rest) {
                        Some(offset) if json[i + offset] == b'\\' => i += offset + 2,
                        Some(offset) => {
                            i += offset;
                            break;
                        }
                        None => return false,
                    }
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    false
}

/// Writes `s` as a JSON string literal.
pub fn write_json_string(out: &mut Vec<u8>, s: &str) {
    // Most long strings (base64 data URIs above all) need no escaping: they
    // are copied whole, where serde_json's writer looks up every byte.
    if !needs_escaping(s.as_bytes()) {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
        return;
    }
    // serde_json's writer cannot fail on a Vec.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// Whether JSON needs any byte of `s` escaped: quotes, backslashes and
/// control characters (what serde_json escapes; it leaves the rest as is).
/// Branch-free over blocks so the compiler can vectorise it.
fn needs_escaping(s: &[u8]) -> bool {
    let escapes = |block: &[u8]| {
        block.iter().fold(false, |found, &b| {
            found | (b < 0x20) | (b == b'"') | (b == b'\\')
        })
    };
    let mut blocks = s.chunks_exact(64);
    blocks.any(escapes) || escapes(blocks.remainder())
}

/// A raw JSON value holding `s` as a string literal.
pub fn raw_string(s: &str) -> Box<RawValue> {
    let mut out = Vec::with_capacity(s.len() + 2);
    write_json_string(&mut out, s);
    raw_from_vec(out)
}

/// Wraps JSON text Iris wrote itself (always valid) as a raw value.
pub fn raw_from_vec(json: Vec<u8>) -> Box<RawValue> {
    let text = String::from_utf8(json).unwrap_or_default();
    RawValue::from_string(text).unwrap_or_else(|_| raw_null())
}

fn raw_null() -> Box<RawValue> {
    RawValue::from_string("null".to_owned()).unwrap_or_else(|_| unreachable!("null is valid JSON"))
}

/// Reads a raw value as a string, borrowing from the body when it holds no escapes.
pub fn as_str(raw: &RawValue) -> Option<Cow<'_, str>> {
    struct StrVisitor;

    impl<'de> Visitor<'de> for StrVisitor {
        type Value = Cow<'de, str>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }

        fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
            Ok(Cow::Borrowed(v))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Cow::Owned(v.to_owned()))
        }

        fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
            Ok(Cow::Owned(v))
        }
    }

    let text = raw.get();
    if !text.starts_with('"') {
        return None;
    }
    let mut deserializer = serde_json::Deserializer::from_str(text);
    deserializer.deserialize_str(StrVisitor).ok()
}

/// The JSON kind of a raw value, from its first byte (raw values are trimmed).
pub fn kind(raw: &RawValue) -> &'static str {
    match raw.get().as_bytes().first() {
        Some(b'{') => "object",
        Some(b'[') => "array",
        Some(b'"') => "string",
        Some(b't' | b'f') => "boolean",
        Some(b'n') => "null",
        _ => "number",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untouched_fields_are_written_back_byte_for_byte() {
        let body = r#"{"b": [1,  2], "a":{"x" : "\u00e9"},"z":null}"#;
        let object: RawObject<'_> = serde_json::from_str(body).expect("object");
        let mut out = Vec::new();
        object.write(&mut out);
        assert_eq!(
            String::from_utf8(out).expect("utf8"),
            r#"{"b":[1,  2],"a":{"x" : "\u00e9"},"z":null}"#
        );
    }

    #[test]
    fn replace_keeps_position_and_drops_duplicates() {
        let mut object: RawObject<'_> =
            serde_json::from_str(r#"{"model":"a","x":1,"model":"b"}"#).expect("object");
        assert_eq!(object.get("model").map(|r| r.get()), Some(r#""b""#));
        object.replace("model", raw_string("c"));
        let mut out = Vec::new();
        object.write(&mut out);
        assert_eq!(
            String::from_utf8(out).expect("utf8"),
            r#"{"x":1,"model":"c"}"#
        );
    }

    #[test]
    fn nesting_is_measured_outside_strings() {
        assert!(!nests_deeper_than(br#"{"a":[[1]]}"#, 3));
        assert!(nests_deeper_than(br#"{"a":[[[1]]]}"#, 3));
        assert!(!nests_deeper_than(br#"{"a":"[[[[\"[[[["}"#, 1));
        assert!(!nests_deeper_than(br#"{"a":"\\"}"#, 1));
        assert!(
            !nests_deeper_than(br#"{"a":"\"#, 1),
            "a trailing escape ends the scan"
        );
        assert!(!nests_deeper_than(br#""\"#, 1));
    }

    #[test]
    fn strings_are_written_as_serde_json_writes_them() {
        let long = "a".repeat(100);
        for s in [
            "",
            "plain",
            "data:image/png;base64,iVBORw0KGgo+/=",
            "quote \" inside",
            "back\\slash",
            "new\nline",
            "\u{1}control",
            "caf\u{e9} \u{1F600} / </script>",
            &format!("{long}\"{long}"),
            &format!("{long}{long}\t"),
        ] {
            let mut ours = Vec::new();
            write_json_string(&mut ours, s);
            assert_eq!(ours, serde_json::to_vec(s).expect("json"), "{s:?}");
        }
    }

    #[test]
    fn strings_borrow_unless_escaped() {
        let plain = RawValue::from_string(r#""abc""#.into()).expect("raw");
        assert!(matches!(as_str(&plain), Some(Cow::Borrowed("abc"))));
        let escaped = RawValue::from_string(r#""a\/b""#.into()).expect("raw");
        assert_eq!(as_str(&escaped).as_deref(), Some("a/b"));
        let number = RawValue::from_string("1".into()).expect("raw");
        assert!(as_str(&number).is_none());
    }
}
