//! URLs in content parts outside an image part's `url`: Iris fetches and
//! checks images only there, so a URL anywhere else in a content part (an
//! `input_image`'s `image_url` string, a `file`'s `file_url`, an extra field)
//! would reach an upstream unexamined, and one that fetches it would do so
//! from inside the provider's network on the client's behalf. The parser
//! refuses them; this finds them.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// Where in `raw` a string holding a URL is, as a path to append to the
/// field's own (`""` for the value itself, `".file_url"`, `"[1]"`).
pub fn find(raw: &RawValue) -> Option<String> {
    let text = raw.get().as_bytes();
    // A URL holds a `:` after its scheme, written as it is or escaped
    // (`\u003a`): most values hold neither and are not read again.
    memchr::memchr2(b':', b'\\', text)?;
    let mut deserializer = serde_json::Deserializer::from_str(raw.get());
    Finder.deserialize(&mut deserializer).ok().flatten()
}

/// The schemes a URL parser reads an authority after whatever follows the
/// `:` (`http:host`, `http:/host`, `http:\\host` are all `http://host/`).
const SPECIAL_SCHEMES: [&[u8]; 6] = [b"http", b"https", b"ws", b"wss", b"ftp", b"file"];

/// Whether `s` is an absolute URL with an authority as a URL parser reads
/// it (WHATWG's, which browsers, Node and the `url` crate follow, and
/// which lenient fetchers approximate): leading spaces, control
/// characters and any other whitespace (which Python's `requests` strips)
/// are trimmed, and tabs and newlines anywhere removed; then
/// `scheme:` for the schemes with an authority always (`HTTP:x` is
/// `http://x/`), `scheme://` for any other.
pub fn is_url(s: &str) -> bool {
    let mut chars = s
        .trim_start_matches(|c: char| c <= ' ' || c.is_whitespace())
        .chars()
        .filter(|c| !matches!(c, '\t' | '\n' | '\r'));
    // The scheme, lowercased; one longer than any special one is only
    // checked for its `://`.
    let mut scheme = [0u8; 5];
    let mut len = 0usize;
    loop {
        match chars.next() {
            Some(c)
                if c.is_ascii_alphabetic()
                    || (len > 0 && (c.is_ascii_digit() || matches!(c, '+' | '.' | '-'))) =>
            {
                if let Some(slot) = scheme.get_mut(len) {
                    *slot = (c as u8).to_ascii_lowercase();
                }
                len += 1;
            }
            Some(':') if len > 0 => break,
            _ => return false,
        }
    }
    if len <= scheme.len() && SPECIAL_SCHEMES.contains(&&scheme[..len]) {
        return true;
    }
    chars.next() == Some('/') && chars.next() == Some('/')
}

/// Walks a value, reporting the first string that is a URL.
struct Finder;

impl<'de> DeserializeSeed<'de> for Finder {
    type Value = Option<String>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Finder {
    type Value = Option<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
        Ok(is_url(s).then(String::new))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        let mut index = 0usize;
        while let Some(hit) = seq.next_element_seed(Finder)? {
            if let (None, Some(path)) = (&found, hit) {
                found = Some(format!("[{index}]{path}"));
            }
            index += 1;
        }
        Ok(found)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            let hit = map.next_value_seed(Finder)?;
            if let (None, Some(path)) = (&found, hit) {
                found = Some(format!(".{key}{path}"));
            }
        }
        Ok(found)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(json: &str) -> Option<String> {
        find(&RawValue::from_string(json.to_owned()).expect("json"))
    }

    #[test]
    fn urls_are_found_in_any_notation_and_depth() {
        assert_eq!(at(r#""http://127.0.0.1/a.png""#).as_deref(), Some(""));
        assert_eq!(at(r#"" HTTPS://x""#).as_deref(), Some(""));
        assert_eq!(at(r#""https:\/\/x""#).as_deref(), Some(""));
        assert_eq!(at(r#""h\u0074tp:\u002f/x""#).as_deref(), Some(""));
        // As a URL parser reads them: an authority after `http:` whatever
        // follows it, tabs and newlines removed, controls trimmed.
        for json in [
            r#""http:169.254.169.254/latest/meta-data/""#,
            r#""http:/169.254.169.254/x""#,
            r#""http:\\169.254.169.254\\x""#,
            r#""HtTpS:x""#,
            r#""ht\ttp://169.254.169.254/""#,
            r#""ht\ntp://x""#,
            r#""\u0000\u001f http://x""#,
            r#""\u00a0\u3000http://x""#,
            r#""ftp:x""#,
            r#""file:/etc/passwd""#,
            r#""ws:x""#,
            r#""h\u0074tp\u003ax""#,
        ] {
            assert_eq!(at(json).as_deref(), Some(""), "{json}");
        }
        assert_eq!(
            at(r#"{"file_id":"f","file_url":"ftp://x/y"}"#).as_deref(),
            Some(".file_url")
        );
        assert_eq!(
            at(r#"{"a":[1,{"b":"gopher://x"}],"c":"s3://b/k"}"#).as_deref(),
            Some(".a[1].b"),
            "the first in order"
        );
    }

    #[test]
    fn other_strings_are_not_urls() {
        for json in [
            r#""data:image/png;base64,iVBO//8=""#,
            r#"{"data":"AAAA//8A","format":"wav"}"#,
            r#""see https://x in the text""#,
            r#""://x""#,
            r#""1http://x""#,
            r#""note: see the attached file""#,
            r#""httpx:y""#,
            r#""mailto:a@b""#,
            r#""urn:isbn:0451450523""#,
            r#"{"format":"wav","data":"AAAA:BBBB"}"#,
            r#"[1,true,null,{"k":"v"}]"#,
        ] {
            assert_eq!(at(json), None, "{json}");
        }
    }
}
