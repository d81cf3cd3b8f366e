//! The cache key: SHA-256 over everything that decides an answer and whose
//! answer it is, each part tagged and length-prefixed so that no two
//! different sets of parts write the same bytes:
//!
//! - the tenant: the client's team, else the client (a team and a client of
//!   the same name are different tenants);
//! - the endpoint (`chat`), so that no answer crosses endpoints;
//! - the model, and a fingerprint of what it resolved to
//!   ([`fingerprint`]): each deployment's upstream, its URL, the model's
//!   name there and its prices. A reload that changes any of them makes
//!   the entries made under the old ones unreachable at once;
//! - the request as it goes upstream, canonical: without `stream`,
//!   `stream_options` and `user`, and each image as the digest of its bytes
//!   (see [`crate::rewrite::ImageWork::digests`]), so that the same picture
//!   by two URLs or as a `data:` URI is the same request. The text is
//!   otherwise the client's: two SDKs that order or space fields differently
//!   are two requests (SDKs send a stable order, so this costs little).

use sha2::{Digest, Sha256};

use crate::catalog::Model;
use crate::upstream::Endpoint;

/// An entry's name: 32 bytes of SHA-256.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey(pub [u8; 32]);

impl CacheKey {
    /// Lower-case hex, for a Redis key.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

/// Whose answers an entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tenant<'a> {
    /// A team's clients share its entries.
    Team(&'a str),
    /// A client without a team has its own.
    Client(&'a str),
}

/// Everything a key is made of.
#[derive(Debug, Clone, Copy)]
pub struct KeyParts<'a> {
    pub tenant: Tenant<'a>,
    /// The API: `chat` ([`crate::openai::Api::as_str`]).
    pub endpoint: &'a str,
    pub model: &'a str,
    /// The model as resolved ([`fingerprint`]).
    pub fingerprint: [u8; 32],
    /// The canonical request ([`crate::openai::chat::ChatRequest::to_cache_text`]).
    pub request: &'a [u8],
}

/// Bumped when what a key covers changes, so old entries are not read as new.
const VERSION: &[u8] = b"iris-response-cache/1";

/// Feeds `bytes` with its length first.
fn field(hash: &mut Sha256, tag: u8, bytes: &[u8]) {
    hash.update([tag]);
    hash.update((bytes.len() as u64).to_le_bytes());
    hash.update(bytes);
}

impl KeyParts<'_> {
    pub fn key(&self) -> CacheKey {
        let mut hash = Sha256::new();
        hash.update(VERSION);
        match self.tenant {
            Tenant::Team(name) => field(&mut hash, b't', name.as_bytes()),
            Tenant::Client(name) => field(&mut hash, b'c', name.as_bytes()),
        }
        field(&mut hash, b'e', self.endpoint.as_bytes());
        field(&mut hash, b'm', self.model.as_bytes());
        field(&mut hash, b'f', &self.fingerprint);
        field(&mut hash, b'r', self.request);
        CacheKey(hash.finalize().into())
    }
}

/// What `model` resolved to, as far as it decides an answer or its price:
/// per deployment (in order) its upstream's name and URL, the model's name
/// there, and its prices.
pub fn fingerprint(model: &Model) -> [u8; 32] {
    let mut hash = Sha256::new();
    for deployment in &model.deployments {
        let upstream = &deployment.upstream;
        field(&mut hash, b'u', upstream.name.as_bytes());
        match &upstream.endpoint {
            Endpoint::Http { chat_url, .. } => {
                field(&mut hash, b'h', chat_url.to_string().as_bytes());
            }
            Endpoint::Demo => field(&mut hash, b'd', b""),
        }
        let sent_as = deployment.upstream_model.as_deref().unwrap_or(&model.name);
        field(&mut hash, b'n', sent_as.as_bytes());
        match &deployment.price {
            Some(price) => {
                let micros = [price.input, price.cached_input, price.output]
                    .map(|m| m.micros().to_le_bytes())
                    .concat();
                field(&mut hash, b'p', &micros);
            }
            None => field(&mut hash, b'p', b""),
        }
    }
    hash.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts<'a>(tenant: Tenant<'a>, model: &'a str, request: &'a [u8]) -> KeyParts<'a> {
        KeyParts {
            tenant,
            endpoint: "chat",
            model,
            fingerprint: [0; 32],
            request,
        }
    }

    #[test]
    fn every_part_changes_the_key_and_a_team_is_not_a_client_of_its_name() {
        let base = parts(Tenant::Team("research"), "m", b"{}");
        let key = base.key();
        assert_eq!(key, base.key(), "stable");
        assert_ne!(key, parts(Tenant::Client("research"), "m", b"{}").key());
        assert_ne!(key, parts(Tenant::Team("ops"), "m", b"{}").key());
        assert_ne!(key, parts(Tenant::Team("research"), "n", b"{}").key());
        assert_ne!(key, parts(Tenant::Team("research"), "m", b"{ }").key());
        assert_ne!(
            key,
            KeyParts {
                endpoint: "embeddings",
                ..base
            }
            .key()
        );
        assert_ne!(
            key,
            KeyParts {
                fingerprint: [1; 32],
                ..base
            }
            .key()
        );
        // Lengths first: moving a byte from one part to the next is another key.
        assert_ne!(
            parts(Tenant::Client("ab"), "c", b"{}").key(),
            parts(Tenant::Client("a"), "bc", b"{}").key()
        );
        assert_eq!(key.hex().len(), 64);
    }
}
