//! The response cache: a successful, complete answer kept for `ttl_s`,
//! served again to the same tenant asking the same model the same thing,
//! without calling upstream.
//!
//! - [`key`]: what makes two requests the same (the tenant, the endpoint,
//!   the model and its resolved upstreams and prices, the request as it goes
//!   upstream with images as their bytes' digests)
//! - [`entry`]: what is kept of an answer, and whether an answer may be kept
//!   at all (complete, no error, no choice cut short by its length)
//! - [`memory`]: the in-process backend, bounded in bytes, least recently
//!   used evicted
//! - [`redis`]: the shared backend on the store's Redis, one key per entry
//! - [`replay`]: an entry as the asking request wants it (plain JSON byte
//!   for byte, or SSE; a stream assembled into JSON and the other way round)
//! - [`tee`]: an answer's bytes collected while they are relayed, offered
//!   to the cache once it ended well
//!
//! Knows nothing of HTTP servers: the gateway decides when to look up and
//! store, and the edge writes `x-iris-cache`. A backend that fails (Redis
//! down) is a miss, logged, never an error for the client.

pub mod entry;
pub mod key;
mod memory;
mod redis;
pub mod replay;
pub mod tee;

use std::sync::Arc;
use std::time::Duration;

pub use entry::{Entry, Form};
pub use key::{CacheKey, Tenant};
pub use redis::RedisLink;
pub use tee::Tee;

/// `[cache] kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheKind {
    #[default]
    Off,
    /// In this process, bounded by `max_bytes`.
    Memory,
    /// On the store's Redis, shared by every instance.
    Redis,
}

/// `[cache]`, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSettings {
    pub kind: CacheKind,
    /// How long an entry is served after it was stored.
    pub ttl: Duration,
    /// The memory backend's bound: entries' bytes and keys.
    pub max_bytes: u64,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            kind: CacheKind::Off,
            ttl: Duration::from_secs(3600),
            max_bytes: 256 * 1024 * 1024,
        }
    }
}

/// The largest entry the Redis backend keeps: one `SET` of a few MB is
/// still quick, and Redis's memory is shared with the budgets.
pub const REDIS_MAX_ENTRY_BYTES: usize = 8 * 1024 * 1024;

/// What a request's `Cache-Control` lets the cache do for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permission {
    /// Answer it from the cache (not with `no-cache` or `no-store`).
    pub lookup: bool,
    /// Keep its answer (not with `no-store`).
    pub store: bool,
}

impl Permission {
    /// `Cache-Control`'s values (every header line) as a client sent them:
    /// `no-cache` skips the lookup, `no-store` skips the lookup and the
    /// storing. Directives are comma-separated and case-insensitive;
    /// anything else is ignored.
    pub fn from_cache_control<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Self {
        let mut permission = Self {
            lookup: true,
            store: true,
        };
        for value in values {
            for directive in value.split(|&b| b == b',') {
                // `no-cache="field"` is a response directive; its name still says no.
                let name = directive
                    .split(|&b| b == b'=')
                    .next()
                    .unwrap_or_default()
                    .trim_ascii();
                if name.eq_ignore_ascii_case(b"no-store") {
                    permission.lookup = false;
                    permission.store = false;
                } else if name.eq_ignore_ascii_case(b"no-cache") {
                    permission.lookup = false;
                }
            }
        }
        permission
    }
}

/// Where entries live.
enum Backend {
    Off,
    Memory(memory::MemoryCache),
    Redis(redis::RedisCache),
}

/// The response cache of a process: one backend, the settings it was built
/// with, and the store's Redis (kept to build a Redis backend again after a
/// reload).
pub struct ResponseCache {
    backend: Backend,
    settings: CacheSettings,
    redis: Option<RedisLink>,
}

impl ResponseCache {
    /// A cache that keeps nothing.
    pub fn off() -> Self {
        Self {
            backend: Backend::Off,
            settings: CacheSettings::default(),
            redis: None,
        }
    }

    /// The cache `settings` describe; `redis` is the store's Redis, when the
    /// store is one (a Redis cache without it is off: the config check
    /// refuses that combination).
    pub fn new(settings: &CacheSettings, redis: Option<RedisLink>) -> Self {
        let backend = match settings.kind {
            CacheKind::Off => Backend::Off,
            CacheKind::Memory => {
                Backend::Memory(memory::MemoryCache::new(settings.max_bytes, settings.ttl))
            }
            CacheKind::Redis => match &redis {
                Some(link) => Backend::Redis(redis::RedisCache::new(link.clone(), settings.ttl)),
                None => {
                    tracing::error!(
                        "cache.kind = \"redis\" needs store.kind = \"redis\": caching off"
                    );
                    Backend::Off
                }
            },
        };
        Self {
            backend,
            settings: *settings,
            redis,
        }
    }

    /// The cache for new `settings` after a reload: unchanged settings keep
    /// this one (its entries included); changed ones start empty, on the
    /// same Redis.
    pub fn succeeding(previous: &Arc<Self>, settings: &CacheSettings) -> Arc<Self> {
        if previous.settings == *settings {
            return Arc::clone(previous);
        }
        Arc::new(Self::new(settings, previous.redis.clone()))
    }

    pub fn is_on(&self) -> bool {
        !matches!(self.backend, Backend::Off)
    }

    /// The largest answer worth collecting for an entry: an eighth of the
    /// memory backend's bound (one answer never flushes the whole cache),
    /// [`REDIS_MAX_ENTRY_BYTES`] on Redis.
    pub fn max_entry_bytes(&self) -> usize {
        match &self.backend {
            Backend::Off => 0,
            Backend::Memory(_) => {
                usize::try_from(self.settings.max_bytes / 8).unwrap_or(usize::MAX)
            }
            Backend::Redis(_) => REDIS_MAX_ENTRY_BYTES,
        }
    }

    /// The entry stored under `key`, if any (a backend that fails: none).
    pub async fn get(&self, key: &CacheKey) -> Option<Arc<Entry>> {
        match &self.backend {
            Backend::Off => None,
            Backend::Memory(memory) => memory.get(key).await,
            Backend::Redis(redis) => redis.get(key).await.map(Arc::new),
        }
    }

    /// Keeps `entry` under `key` for `ttl_s` (a backend that fails: not
    /// kept, logged).
    pub async fn put(&self, key: CacheKey, entry: Entry) {
        if entry.weight() > self.max_entry_bytes() {
            return;
        }
        match &self.backend {
            Backend::Off => {}
            Backend::Memory(memory) => memory.put(key, entry).await,
            Backend::Redis(redis) => redis.put(&key, &entry).await,
        }
    }
}

/// Counts a request of a cache-enabled model answered from the cache.
pub fn count_hit(model: &str) {
    crate::metrics::CACHE_HITS
        .counter(&[("model", model)])
        .increment(1);
}

/// Counts a request of a cache-enabled model that was not: nothing stored,
/// the backend failed, or its `Cache-Control` skipped the lookup.
pub fn count_miss(model: &str) {
    crate::metrics::CACHE_MISSES
        .counter(&[("model", model)])
        .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn permission(values: &[&str]) -> (bool, bool) {
        let p = Permission::from_cache_control(values.iter().map(|v| v.as_bytes()));
        (p.lookup, p.store)
    }

    #[test]
    fn cache_control_no_cache_skips_the_lookup_and_no_store_both() {
        assert_eq!(permission(&[]), (true, true));
        assert_eq!(permission(&["no-cache"]), (false, true));
        assert_eq!(permission(&["No-Store"]), (false, false));
        assert_eq!(permission(&["max-age=0, no-store"]), (false, false));
        assert_eq!(permission(&["max-age=0", " NO-CACHE "]), (false, true));
        assert_eq!(permission(&["no-cache=\"x\""]), (false, true));
        assert_eq!(permission(&["no-transform, max-age=60"]), (true, true));
        assert_eq!(permission(&["no-storex"]), (true, true));
    }
}
