//! Client keys: generation, the `sha256:` hash form kept in config, and
//! constant-time matching. A key itself is never stored, logged or compared
//! byte by byte.

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
/// case-insensitively, spaces around the key ignored.
pub fn bearer_key(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = value.split_once(' ')?;
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
