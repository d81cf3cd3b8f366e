//! Credentials from the config (upstream API keys, a Redis URL with a
//! password): a wrapper that prints as `***`, so neither `Debug` output, a log
//! line nor an error message can carry one; [`mask_credentials`], for
//! text from elsewhere that may hold one; and [`KeyMask`], for a body
//! relayed to a client that may hold a key Iris sent its upstream.

use std::fmt;

use bytes::Bytes;

use serde::Deserialize;

#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The only way to read the value; grep for it to audit where secrets go.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// `text` with every credential-shaped part replaced by `***`, for logging
/// what another party sent (an upstream's error body may echo the key Iris
/// sent it). Masked: each of `known` (the credentials Iris holds for that
/// party), and any token that is
///
/// - after `Bearer` or `Basic` (an echoed `Authorization`);
/// - the value of a field or parameter named like a credential (`api_key`,
///   `token`, `secret`, `password`, `authorization`, …) after `:` or `=`,
///   quoted or not: `"api_key": "…"`, `key=…`;
/// - of a known key shape: `sk-`, `sk_`, `rk_`, `pk_`, `gsk_`, `xai-`,
///   `hf_`, `AIza` (Google), `eyJ` (a JWT), `ghp_`, `github_pat_`;
/// - an opaque string of 24 or more letters, digits, `-` and `_` with both
///   letters and digits in it (hex or base64url keys of any provider).
///
/// A token is a run of the characters a bearer token may hold (RFC 6750:
/// letters, digits, `-._~+/`, trailing `=`). Masking too much is the safe
/// side: the text is for an operator's log, and request ids or UUIDs in it
/// are masked too.
pub fn mask_credentials(text: &str, known: &[&str]) -> String {
    let mut text = text.to_owned();
    for secret in known.iter().filter(|s| !s.is_empty()) {
        text = text.replace(secret, "***");
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(start) = rest.find(is_token_char) {
        let (before, from) = rest.split_at(start);
        out.push_str(before);
        let mut end = from.find(|c| !is_token_char(c)).unwrap_or(from.len());
        // Base64 padding belongs to the token, unless a value follows it
        // (`key=value`: the `=` is a separator).
        let padding = from[end..].len() - from[end..].trim_start_matches('=').len();
        let after = &from[end + padding..];
        if padding > 0 && !after.starts_with(is_token_char) {
            end += padding;
        }
        let token = &from[..end];
        if is_credential(token, &out) {
            out.push_str("***");
        } else {
            out.push_str(token);
        }
        rest = &from[end..];
    }
    out.push_str(rest);
    out
}

/// One known secret blanked out of a body relayed chunk by chunk (an
/// upstream's error body that echoes the key Iris sent it): each
/// occurrence becomes as many `*`, so a declared length still holds, also
/// where it straddles two chunks. The end of a chunk that may begin the
/// secret is held back until the next chunk, or the body's end, tells.
pub struct KeyMask {
    secret: Box<[u8]>,
    held: Vec<u8>,
}

impl KeyMask {
    /// A mask for `secret`; none for an empty one.
    pub fn new(secret: &[u8]) -> Option<Self> {
        (!secret.is_empty()).then(|| Self {
            secret: secret.into(),
            held: Vec::new(),
        })
    }

    /// What of `chunk` (after what was held back) can go out now, the
    /// secret blanked out; possibly nothing.
    pub fn chunk(&mut self, chunk: &[u8]) -> Bytes {
        let mut out = std::mem::take(&mut self.held);
        out.extend_from_slice(chunk);
        let mut from = 0;
        while let Some(at) = memchr::memmem::find(&out[from..], &self.secret) {
            let start = from + at;
            from = start + self.secret.len();
            out[start..from].fill(b'*');
        }
        // The longest end that is a beginning of the secret (shorter than
        // it: a whole one was blanked out above).
        let held = (1..self.secret.len().min(out.len() + 1))
            .rev()
            .find(|&n| out.ends_with(&self.secret[..n]))
            .unwrap_or(0);
        self.held = out.split_off(out.len() - held);
        Bytes::from(out)
    }

    /// What was held back, at the body's end: not the secret after all.
    pub fn finish(&mut self) -> Bytes {
        Bytes::from(std::mem::take(&mut self.held))
    }
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~' | '+' | '/')
}

/// Whether `token`, which comes right after `before`, is a credential.
fn is_credential(token: &str, before: &str) -> bool {
    const SCHEMES: [&str; 2] = ["bearer", "basic"];
    const NAMES: [&str; 8] = [
        "key",
        "token",
        "secret",
        "password",
        "passwd",
        "authorization",
        "credential",
        "credentials",
    ];
    const PREFIXES: [&str; 11] = [
        "sk-",
        "sk_",
        "rk_",
        "pk_",
        "gsk_",
        "xai-",
        "hf_",
        "AIza",
        "eyJ",
        "ghp_",
        "github_pat_",
    ];
    if SCHEMES.iter().any(|s| token.eq_ignore_ascii_case(s)) {
        return false;
    }
    // What decides is just before the token: a scheme, a field's name.
    let mut from = before.len().saturating_sub(64);
    while !before.is_char_boundary(from) {
        from += 1;
    }
    let lower = before[from..].to_ascii_lowercase();
    // `Bearer TOKEN`: the scheme, then spaces.
    let spaced = lower.trim_end_matches([' ', '\t']);
    if spaced.len() < lower.len() && SCHEMES.iter().any(|s| ends_with_word(spaced, s)) {
        return true;
    }
    // `name": "TOKEN"`, `name=TOKEN`, `name: TOKEN`: a separator between.
    let name = lower.trim_end_matches([' ', '\t', '"', '\'']);
    if let Some(name) = name
        .strip_suffix(':')
        .or_else(|| name.strip_suffix('='))
        .map(|n| n.trim_end_matches([' ', '\t', '"', '\'']))
        && NAMES.iter().any(|n| name.ends_with(n))
    {
        return true;
    }
    if token.len() >= 8 && PREFIXES.iter().any(|p| token.starts_with(p)) {
        return true;
    }
    token.len() >= 24
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && token.bytes().any(|b| b.is_ascii_digit())
        && token.bytes().any(|b| b.is_ascii_alphabetic())
}

/// Whether `text` ends with the word `word` (not a longer word's end).
fn ends_with_word(text: &str, word: &str) -> bool {
    text.strip_suffix(word)
        .is_some_and(|head| !head.ends_with(|c: char| c.is_ascii_alphanumeric()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `body` relayed in the chunks `cuts` make of it, through a mask.
    fn relayed(body: &[u8], cuts: &[usize], secret: &[u8]) -> Vec<u8> {
        let mut mask = KeyMask::new(secret).expect("a secret");
        let mut out = Vec::new();
        let mut from = 0;
        for &cut in cuts.iter().chain([body.len()].iter()) {
            out.extend_from_slice(&mask.chunk(&body[from..cut]));
            from = cut;
        }
        out.extend_from_slice(&mask.finish());
        out
    }

    #[test]
    fn a_key_is_blanked_out_of_a_relayed_body_wherever_the_chunks_cut_it() {
        let secret = b"sk-upstream";
        let body = b"{\"echo\":\"Bearer sk-upstream\",\"again\":\"sk-upstreamsk-upstream\",\"near\":\"sk-upstrea\"}";
        let blanked = b"{\"echo\":\"Bearer ***********\",\"again\":\"**********************\",\"near\":\"sk-upstrea\"}";
        assert_eq!(relayed(body, &[], secret), blanked);
        // Every single cut, and every pair of cuts: the same bytes, the
        // same length, whatever straddles what.
        for one in 0..=body.len() {
            assert_eq!(relayed(body, &[one], secret), blanked, "cut at {one}");
            for two in one..=body.len() {
                assert_eq!(
                    relayed(body, &[one, two], secret),
                    blanked,
                    "cuts at {one}, {two}"
                );
            }
        }
        // A body ending in what begins the secret gets it back at the end.
        assert_eq!(relayed(b"ends in sk-up", &[10], secret), b"ends in sk-up");
        // One byte at a time.
        let cuts: Vec<usize> = (1..body.len()).collect();
        assert_eq!(relayed(body, &cuts, secret), blanked);
        assert!(KeyMask::new(b"").is_none(), "an empty secret masks nothing");
    }

    #[test]
    fn credentials_in_text_are_masked() {
        let key = "upstream-secret-key";
        for (text, masked) in [
            (
                r#"{"error": {"message": "bad header: Bearer upstream-secret-key"}}"#,
                r#"{"error": {"message": "bad header: Bearer ***"}}"#,
            ),
            // Any bearer token, not only the one Iris holds.
            ("authorization: bearer abc.def", "authorization: bearer ***"),
            (
                "Authorization: Basic dXNlcjpwYXNz==",
                "Authorization: Basic ***",
            ),
            (
                r#"{"api_key": "k1", "token":"t2", "x_secret" : 'abc'}"#,
                r#"{"api_key": "***", "token":"***", "x_secret" : '***'}"#,
            ),
            (
                "GET /v1?key=abc123&model=m password=hunter2",
                "GET /v1?key=***&model=m password=***",
            ),
            (
                "Incorrect API key provided: sk-proj-abc***wxyz.",
                "Incorrect API key provided: ******wxyz.",
            ),
            ("a JWT eyJhbGciOi.eyJzdWIi.c2ln", "a JWT ***"),
            (
                "key 0123456789abcdef0123456789abcdef rejected",
                "key *** rejected",
            ),
            // The known key wherever it is, even inside a longer word.
            ("xupstream-secret-keyx", "x***x"),
            // What is not a credential stays.
            (
                "The API key provided is invalid (status 401, model gpt-4o-mini).",
                "The API key provided is invalid (status 401, model gpt-4o-mini).",
            ),
            (
                "https://api.example.com/v1/chat",
                "https://api.example.com/v1/chat",
            ),
            ("", ""),
        ] {
            assert_eq!(mask_credentials(text, &[key]), masked, "{text}");
        }
    }

    #[test]
    fn secrets_never_print() {
        let secret = Secret::new("sk-live-123");
        assert_eq!(format!("{secret:?} {secret}"), "*** ***");
        assert!(!format!("{:?}", Some(&secret)).contains("sk-live"));
    }
}
