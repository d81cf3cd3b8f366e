//! A JSON object kept as the text it was sent as, so that Iris can read and
//! replace the few fields it cares about and write every other field back
//! byte for byte (unknown fields included) without parsing or re-serializing
//! them.
//!
//! Only the fields Iris interprets are held one by one; the fields between
//! them are held as runs of the body's text (`"a":1,"b":[2]`). An object of a
//! million unknown fields costs one slice, not a million entries: what a
//! parse allocates follows what Iris reads, not the shape of the JSON.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// One interpreted field's value: borrowed from the request body, written by
/// Iris, or parsed into a structure that its owner writes back (see
/// [`RawObject::from_map`]).
#[derive(Debug)]
enum Value<'a> {
    Borrowed(&'a RawValue),
    Owned(Box<RawValue>),
    Parsed,
}

impl Value<'_> {
    fn raw(&self) -> Option<&RawValue> {
        match self {
            Value::Borrowed(raw) => Some(raw),
            Value::Owned(raw) => Some(raw),
            Value::Parsed => None,
        }
    }
}

#[derive(Debug)]
enum Entry<'a> {
    /// Fields Iris does not interpret, side by side as in the body, commas
    /// and all: `"a":1,"b":[2]`.
    Run(&'a [u8]),
    /// A field Iris reads, replaces or parses.
    Field(Cow<'a, str>, Value<'a>),
}

/// What [`RawObject::from_map`]'s caller did with a field's value.
pub enum Claim<'a> {
    /// Nothing: keep it as it is, with the fields around it.
    Raw,
    /// Read it raw to inspect it; keep it as it is, like [`Claim::Raw`].
    Inspected(&'a RawValue),
    /// Read it raw to interpret it: keep it as a field of its own, to be
    /// read ([`RawObject::get`]) or replaced.
    Peeked(&'a RawValue),
    /// Parsed it into a structure of the caller's, which writes it back.
    Parsed,
}

/// The keys of an object that Iris interprets: each may appear once (an
/// upstream whose parser keeps the first of two `model`s would otherwise
/// serve another model than the one Iris checked), and only these are held
/// one by one. Nor may a key differ from one of them only in case: Go's
/// `encoding/json` (and the servers built on it) takes `"Model"` or
/// `"ſtream"` for `model` and `stream`, which Iris would have passed on
/// unread.
#[derive(Debug, Clone, Copy)]
pub struct Interpreted(pub &'static [&'static str]);

impl Interpreted {
    pub const NONE: Self = Self(&[]);

    fn position(self, key: &str) -> Option<usize> {
        self.0.iter().position(|k| *k == key)
    }

    /// The interpreted key that `key`, not one itself, differs from only in
    /// case.
    fn folded(self, key: &str) -> Option<&'static str> {
        self.0.iter().copied().find(|field| folds_to(key, field))
    }
}

/// The message for a field refused by [`RawObject::from_map`]'s
/// `duplicate`: `key` at `param`, given twice or in another case than the
/// interpreted `field`.
pub fn repeated_message(param: &str, key: &str, field: &str) -> String {
    if key == field {
        format!("'{param}' is given more than once; give it once.")
    } else {
        format!(
            "'{param}' differs from '{field}' only in case, and some upstreams read it as \
             '{field}'; give the field once, as '{field}'."
        )
    }
}

/// Whether `key` is `field` (lowercase ASCII, as every interpreted key is)
/// under case folding as Go's `encoding/json` matches names (`foldName`:
/// each rune to the smallest of its `unicode.SimpleFold` orbit): ASCII
/// letters in either case, and the two other characters whose orbit holds
/// an ASCII letter (`ſ` with `s`, the Kelvin sign with `k`).
fn folds_to(key: &str, field: &str) -> bool {
    let mut wanted = field.bytes();
    for c in key.chars() {
        let folded = match c {
            'ſ' => b's',
            '\u{212A}' => b'k',
            c if c.is_ascii() => (c as u8).to_ascii_lowercase(),
            _ => return false,
        };
        if wanted.next() != Some(folded) {
            return false;
        }
    }
    wanted.next().is_none()
}

/// A JSON object as an ordered list of its interpreted fields and the runs
/// of text between them.
#[derive(Debug, Default)]
pub struct RawObject<'a> {
    entries: Vec<Entry<'a>>,
}

impl<'a> RawObject<'a> {
    /// Parses `text`, a JSON object, holding the `interpreted` keys one by
    /// one; `None` when it is not an object or repeats one of them.
    pub fn parse(text: &'a str, interpreted: Interpreted) -> Option<Self> {
        struct ObjectSeed<'a>(&'a [u8], Interpreted);

        impl<'de> DeserializeSeed<'de> for ObjectSeed<'de> {
            type Value = RawObject<'de>;

            fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                d.deserialize_map(self)
            }
        }

        impl<'de> Visitor<'de> for ObjectSeed<'de> {
            type Value = RawObject<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let interpreted = self.1;
                RawObject::from_map(
                    self.0,
                    &mut map,
                    interpreted,
                    |key, _| de::Error::custom(format_args!("`{key}` repeated")),
                    |key, map| match interpreted.position(key) {
                        Some(_) => Ok(Claim::Peeked(map.next_value()?)),
                        None => Ok(Claim::Raw),
                    },
                )
            }
        }

        let mut deserializer = serde_json::Deserializer::from_str(text);
        let object = ObjectSeed(text.as_bytes(), interpreted)
            .deserialize(&mut deserializer)
            .ok()?;
        deserializer.end().ok()?;
        Some(object)
    }

    fn fields(&self) -> impl DoubleEndedIterator<Item = (&str, &Value<'a>)> {
        self.entries.iter().filter_map(|entry| match entry {
            Entry::Field(key, value) => Some((key.as_ref(), value)),
            Entry::Run(_) => None,
        })
    }

    /// The value of an interpreted `key` (see [`RawObject::from_map`]).
    pub fn get(&self, key: &str) -> Option<&RawValue> {
        self.fields()
            .rev()
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| v.raw())
    }

    /// [`RawObject::get`], as borrowed from the body, so it may outlive `self`.
    pub fn get_borrowed(&self, key: &str) -> Option<&'a RawValue> {
        self.entries.iter().rev().find_map(|entry| match entry {
            Entry::Field(k, Value::Borrowed(raw)) if k == key => Some(*raw),
            _ => None,
        })
    }

    /// Replaces an interpreted `key` in place, keeping its position, or
    /// appends it.
    pub fn replace(&mut self, key: &str, value: Box<RawValue>) {
        let found = self.entries.iter_mut().rev().find_map(|entry| match entry {
            Entry::Field(k, v) if k == key => Some(v),
            _ => None,
        });
        match found {
            Some(slot) => *slot = Value::Owned(value),
            None => self.entries.push(Entry::Field(
                Cow::Owned(key.to_owned()),
                Value::Owned(value),
            )),
        }
    }

    /// Removes an interpreted `key`; whether it was there.
    pub fn remove(&mut self, key: &str) -> bool {
        let before = self.entries.len();
        self.entries
            .retain(|entry| !matches!(entry, Entry::Field(k, _) if k == key));
        self.entries.len() != before
    }

    /// Reads a JSON object's fields in one pass. `body` is the text the
    /// deserializer reads (the values it lends are slices of it).
    /// `claim(key, map)` says what becomes of each value (see [`Claim`]);
    /// unclaimed values stay as they are, in runs of the body's text. A key
    /// of `interpreted` met a second time fails with `duplicate(key, key)`,
    /// before its value is read; a key that differs from one only in case
    /// with `duplicate(key, the interpreted one)`.
    pub fn from_map<A: MapAccess<'a>>(
        body: &'a [u8],
        map: &mut A,
        interpreted: Interpreted,
        duplicate: impl Fn(&str, &str) -> A::Error,
        mut claim: impl FnMut(&str, &mut A) -> Result<Claim<'a>, A::Error>,
    ) -> Result<Self, A::Error> {
        // Room for most objects' fields and runs at once, not a doubling
        // at a time (a chat request's top level holds about four).
        let mut entries: Vec<Entry<'a>> = Vec::with_capacity(8);
        let mut seen = 0u64;
        while let Some(key) = map.next_key_seed(KeySeed)? {
            match interpreted.position(&key) {
                Some(index) if index < 64 => {
                    if seen & (1 << index) != 0 {
                        return Err(duplicate(&key, &key));
                    }
                    seen |= 1 << index;
                }
                Some(_) => {}
                None => {
                    if let Some(field) = interpreted.folded(&key) {
                        return Err(duplicate(&key, field));
                    }
                }
            }
            let raw = match claim(&key, map)? {
                Claim::Raw => map.next_value::<&'a RawValue>()?,
                Claim::Inspected(raw) => raw,
                Claim::Peeked(raw) => {
                    entries.push(Entry::Field(key, Value::Borrowed(raw)));
                    continue;
                }
                Claim::Parsed => {
                    entries.push(Entry::Field(key, Value::Parsed));
                    continue;
                }
            };
            let Some((start, end)) = field_span(body, raw) else {
                // Not a slice of `body` (never with serde_json's borrowing
                // readers): held on its own.
                entries.push(Entry::Field(key, Value::Borrowed(raw)));
                continue;
            };
            match entries.last_mut() {
                // The run grows over the comma to this field's value.
                Some(Entry::Run(run)) => {
                    let run_start = run.as_ptr() as usize - body.as_ptr() as usize;
                    *run = &body[run_start..end];
                }
                _ => entries.push(Entry::Run(&body[start..end])),
            }
        }
        Ok(RawObject { entries })
    }

    /// Writes the object; `override_field` writes the text of each parsed
    /// field (returning whether it did).
    pub fn write_with(
        &self,
        out: &mut Vec<u8>,
        override_field: impl FnMut(&str, &mut Vec<u8>) -> bool,
    ) {
        self.write_without(out, &[], override_field);
    }

    /// [`RawObject::write_with`], leaving out the interpreted fields named
    /// in `omit`.
    pub fn write_without(
        &self,
        out: &mut Vec<u8>,
        omit: &[&str],
        mut override_field: impl FnMut(&str, &mut Vec<u8>) -> bool,
    ) {
        out.push(b'{');
        let mut first = true;
        for entry in &self.entries {
            if matches!(entry, Entry::Field(key, _) if omit.contains(&key.as_ref())) {
                continue;
            }
            if !first {
                out.push(b',');
            }
            first = false;
            match entry {
                Entry::Run(text) => out.extend_from_slice(text),
                Entry::Field(key, value) => {
                    write_json_string(out, key);
                    out.push(b':');
                    let parsed = matches!(value, Value::Parsed);
                    if !(parsed && override_field(key, out)) {
                        let raw = value.raw().map_or("null", RawValue::get);
                        out.extend_from_slice(raw.as_bytes());
                    }
                }
            }
        }
        out.push(b'}');
    }

    pub fn write(&self, out: &mut Vec<u8>) {
        self.write_with(out, |_, _| false);
    }
}

/// Where the field whose value is `value` lies in `body`: from its key's
/// opening quote to the value's end. Found by stepping back from the value
/// over `:` and the key string (a quote inside a JSON string is always
/// escaped, so the first quote behind the key's closing one that is not
/// preceded by an odd number of backslashes opens the key).
fn field_span(body: &[u8], value: &RawValue) -> Option<(usize, usize)> {
    let text = value.get().as_bytes();
    let start = (text.as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
    let end = start
        .checked_add(text.len())
        .filter(|&end| end <= body.len())?;
    let before = &body[..start];
    let mut i = before.iter().rposition(|b| !b.is_ascii_whitespace())?;
    if before[i] != b':' {
        return None;
    }
    i = before[..i].iter().rposition(|b| !b.is_ascii_whitespace())?;
    if before[i] != b'"' {
        return None;
    }
    let mut quote = i;
    loop {
        quote = memchr::memrchr(b'"', &before[..quote])?;
        let backslashes = before[..quote]
            .iter()
            .rev()
            .take_while(|&&b| b == b'\\')
            .count();
        if backslashes % 2 == 0 {
            return Some((quote, end));
        }
    }
}

/// A key, borrowed from the body unless it holds escapes.
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(StrVisitor)
    }
}

/// Whether `json` nests arrays and objects deeper than `max`.
///
/// Iris itself never recurses over fields it passes through (they stay raw),
/// but an upstream parser might: absurd nesting is refused up front. Strings
/// are skipped with `memchr`, so a large base64 image costs microseconds.
pub fn nests_deeper_than(json: &[u8], max: usize) -> bool {
    // No more opening brackets than `max` (in strings or not) cannot nest
    // deeper. Most bodies open a handful: counting them is a few searches,
    // where walking the strings is one search for each string.
    if memchr::memchr2_iter(b'[', b'{', json).nth(max).is_none() {
        return false;
    }
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
pub fn needs_escaping(s: &[u8]) -> bool {
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

/// Reads a string, borrowing from the input when it holds no escapes.
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

/// Reads a raw value as a string, borrowing from the body when it holds no escapes.
pub fn as_str(raw: &RawValue) -> Option<Cow<'_, str>> {
    let text = raw.get();
    if !text.starts_with('"') {
        return None;
    }
    // A raw value is valid JSON, so a string without a backslash is its
    // text between the quotes: no second parse for a model's name or a
    // role (a few hundred instructions each).
    if let Some(inner) = text
        .strip_prefix('"')
        .and_then(|text| text.strip_suffix('"'))
        && memchr::memchr(b'\\', inner.as_bytes()).is_none()
    {
        return Some(Cow::Borrowed(inner));
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
        let object = RawObject::parse(body, Interpreted::NONE).expect("object");
        assert_eq!(object.entries.len(), 1, "one run: {object:?}");
        let mut out = Vec::new();
        object.write(&mut out);
        assert_eq!(
            String::from_utf8(out).expect("utf8"),
            r#"{"b": [1,  2], "a":{"x" : "\u00e9"},"z":null}"#
        );
    }

    #[test]
    fn interpreted_fields_are_held_between_runs_and_replaced_in_place() {
        const KEYS: Interpreted = Interpreted(&["model"]);
        let body = r#"{ "x":1 , "m\"o":2,"model" : "a","y":[3],"z":"\"}"}"#;
        let mut object = RawObject::parse(body, KEYS).expect("object");
        assert_eq!(object.entries.len(), 3, "{object:?}");
        assert_eq!(object.get("model").map(|r| r.get()), Some(r#""a""#));
        assert!(object.get("x").is_none(), "only interpreted keys are held");
        object.replace("model", raw_string("c"));
        let mut out = Vec::new();
        object.write(&mut out);
        assert_eq!(
            String::from_utf8(out).expect("utf8"),
            r#"{"x":1 , "m\"o":2,"model":"c","y":[3],"z":"\"}"}"#
        );
        assert!(object.remove("model"));
        object.replace("added", raw_string("d"));
        let mut out = Vec::new();
        object.write(&mut out);
        assert_eq!(
            String::from_utf8(out).expect("utf8"),
            r#"{"x":1 , "m\"o":2,"y":[3],"z":"\"}","added":"d"}"#
        );
    }

    #[test]
    fn an_interpreted_key_given_twice_is_refused() {
        const KEYS: Interpreted = Interpreted(&["model"]);
        assert!(RawObject::parse(r#"{"model":"a","model":"b"}"#, KEYS).is_none());
        assert!(RawObject::parse(r#"{"x":"a","x":"b"}"#, KEYS).is_some());
    }

    #[test]
    fn a_key_is_found_behind_escaped_quotes_and_backslashes() {
        for body in [
            r#"{"a\\":1}"#,
            r#"{"\"":1,"b":2}"#,
            r#"{"\\\"x":1}"#,
            "{\n \"k\"\t:\r 5}",
        ] {
            let object = RawObject::parse(body, Interpreted::NONE).expect(body);
            let mut out = Vec::new();
            object.write(&mut out);
            let expected: serde_json::Value = serde_json::from_str(body).expect("json");
            let written: serde_json::Value = serde_json::from_slice(&out).expect("json");
            assert_eq!(written, expected, "{body}");
        }
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
        // Counted first: no more openings than the limit is never deeper.
        assert!(!nests_deeper_than(b"[{[", 3));
        assert!(nests_deeper_than(b"[{[{", 3));
        assert!(!nests_deeper_than(b"[{[\"{\"", 3));
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
        for (json, text) in [
            (r#""""#, ""),
            (r#""é ✓""#, "é ✓"),
            (r#""\"""#, "\""),
            (r#""a\\b""#, "a\\b"),
            (r#""\u00e9\n""#, "é\n"),
        ] {
            let raw = RawValue::from_string(json.into()).expect("raw");
            assert_eq!(as_str(&raw).as_deref(), Some(text), "{json}");
        }
    }
}
