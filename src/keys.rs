//! Client keys: generation, the `sha256:` hash form kept in config, and
//! constant-time matching, in one lookup however many keys there are
//! ([`KeyIndex`]). A key itself is never stored, logged or compared byte by
//! byte.

use std::collections::HashMap;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const HASH_PREFIX: &str = "sha256:";

/// The SHA-256 of a client key, as configured.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash([u8; 32]);

impl KeyHash {
    /// Hashes a presented key.
    pub fn of(key: &str) -> Self {
        Self(Sha256::digest(key.as_bytes()).into())
    }

    /// Parses `sha256:<64 hex digits>`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let hex_digits = text.strip_prefix(HASH_PREFIX).ok_or_else(|| {
            format!("must start with \"{HASH_PREFIX}\" (run `iris key hash KEY`)")
        })?;
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex_digits, &mut bytes)
            .map_err(|_| "must be sha256: followed by 64 hex digits".to_string())?;
        Ok(Self(bytes))
    }

    /// Constant-time equality: the time taken does not depend on where the hashes differ.
    pub fn matches(&self, other: &KeyHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }

    /// The digest's first 8 bytes: where [`KeyIndex`] looks.
    fn prefix(&self) -> u64 {
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        u64::from_le_bytes(first)
    }
}

/// Values found by a presented key's hash in one lookup, however many there
/// are. The lookup goes by the digest's first 8 bytes (its timing can tell
/// of digests only, which say nothing of any key), and each hash found there
/// is compared whole, in constant time, as every configured hash once was
/// one by one: a comparison a client, 32 µs a request among 1,000 clients.
pub struct KeyIndex<T> {
    by_prefix: HashMap<u64, Vec<(KeyHash, T)>, foldhash::fast::RandomState>,
}

impl<T> Default for KeyIndex<T> {
    fn default() -> Self {
        Self {
            by_prefix: HashMap::default(),
        }
    }
}

impl<T> KeyIndex<T> {
    /// Adds `value` under `key`; a second value under the same hash is kept
    /// but never found (the config check and the registry refuse a hash
    /// given twice).
    pub fn insert(&mut self, key: KeyHash, value: T) {
        self.by_prefix
            .entry(key.prefix())
            .or_default()
            .push((key, value));
    }

    /// The value whose key hashes to `presented`.
    pub fn get(&self, presented: &KeyHash) -> Option<&T> {
        let mut found = None;
        for (key, value) in self.by_prefix.get(&presented.prefix())? {
            if key.matches(presented) && found.is_none() {
                found = Some(value);
            }
        }
        found
    }
}

/// The number of keys only: a listing of hashes has no place in a log.
impl<T> std::fmt::Debug for KeyIndex<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyIndex")
            .field(
                "keys",
                &self.by_prefix.values().map(Vec::len).sum::<usize>(),
            )
            .finish()
    }
}

impl<T> FromIterator<(KeyHash, T)> for KeyIndex<T> {
    fn from_iter<I: IntoIterator<Item = (KeyHash, T)>>(entries: I) -> Self {
        let mut index = Self::default();
        for (key, value) in entries {
            index.insert(key, value);
        }
        index
    }
}

impl std::fmt::Display for KeyHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{HASH_PREFIX}{}", hex::encode(self.0))
    }
}

impl std::fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyHash(..)")
    }
}

/// The key of `Authorization: Bearer KEY`: the scheme matched
/// case-insensitively, spaces around the key ignored. None from a request
/// with two `Authorization` headers: which one is meant is not clear (a
/// proxy in front may have read the other).
pub fn bearer_key(headers: &http::HeaderMap) -> Option<&str> {
    let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
    let value = values.next()?.to_str().ok()?;
    if values.next().is_some() {
        return None;
    }
    // The first space, found byte by byte: six bytes in, where `str`'s
    // pattern search costs more to set up than to run.
    let space = value.bytes().position(|b| b == b' ')?;
    let (scheme, key) = (&value[..space], &value[space + 1..]);
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| key.trim())
        .filter(|key| !key.is_empty())
}

/// A fresh client key: `iris-` and 32 random bytes in hex.
pub fn generate() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(format!("iris-{}", hex::encode(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bearer_key_is_read_whatever_the_schemes_case_and_the_spaces() {
        let key = |value: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert(
                http::header::AUTHORIZATION,
                http::HeaderValue::from_str(value).unwrap(),
            );
            bearer_key(&headers).map(str::to_owned)
        };
        assert_eq!(key("Bearer k-1").as_deref(), Some("k-1"));
        assert_eq!(key("bearer k-1").as_deref(), Some("k-1"));
        assert_eq!(key("BEARER   k-1  ").as_deref(), Some("k-1"));
        for refused in [
            "Basic k-1",
            "Bearer",
            "Bearer ",
            "Bearer   ",
            "Bearerk-1",
            " Bearer k",
        ] {
            assert_eq!(key(refused), None, "{refused:?}");
        }
        assert_eq!(bearer_key(&http::HeaderMap::new()), None);
        let mut two = http::HeaderMap::new();
        for value in ["Bearer k-1", "Bearer k-2"] {
            two.append(
                http::header::AUTHORIZATION,
                http::HeaderValue::from_static(value),
            );
        }
        assert_eq!(bearer_key(&two), None, "two keys: neither");
    }

    #[test]
    fn hash_round_trips_through_its_text_form() {
        let hash = KeyHash::of("test");
        assert_eq!(
            hash.to_string(),
            "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
        let parsed = KeyHash::parse(&hash.to_string()).expect("parses");
        assert!(parsed.matches(&hash));
        assert!(!parsed.matches(&KeyHash::of("tesT")));
    }

    /// Hashes that share their first 8 bytes sit in one place of the
    /// index: each is found whole, and a presented hash that shares only
    /// the prefix finds nothing.
    #[test]
    fn the_index_finds_a_hash_whole_among_those_sharing_its_prefix() {
        let hash = |tail: &str| {
            KeyHash::parse(&format!("sha256:0123456789abcdef{tail:0>48}")).expect("hash")
        };
        let index: KeyIndex<&str> = [(hash("1"), "one"), (hash("2"), "two")]
            .into_iter()
            .chain([(KeyHash::of("other"), "other")])
            .collect();
        assert_eq!(index.get(&hash("1")), Some(&"one"));
        assert_eq!(index.get(&hash("2")), Some(&"two"));
        assert_eq!(index.get(&KeyHash::of("other")), Some(&"other"));
        assert_eq!(index.get(&hash("3")), None);
        assert_eq!(index.get(&KeyHash::of("nope")), None);
        assert_eq!(format!("{index:?}"), "KeyIndex { keys: 3 }");
    }

    #[test]
    fn malformed_hashes_are_refused() {
        assert!(KeyHash::parse("9f86d0").is_err());
        assert!(KeyHash::parse("sha256:zz").is_err());
        assert!(KeyHash::parse("sha256:9f86").is_err());
    }

    #[test]
    fn generated_keys_are_distinct() {
        let a = generate().expect("random");
        let b = generate().expect("random");
        assert_ne!(a, b);
        assert!(a.starts_with("iris-") && a.len() == 5 + 64);
    }
}
