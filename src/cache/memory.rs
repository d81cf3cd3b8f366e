//! The in-process backend: moka's bounded cache, weighed in bytes (each
//! entry's bytes, its key, and what it costs to hold beyond them), the
//! least recently used entries evicted first (moka's LRU policy: a new
//! answer is always admitted), each entry dropped `ttl` after it was
//! stored.
//!
//! Moka evicts in its housekeeping rather than inside `insert`; it is run
//! after each insert so that the cache is back under its bound before the
//! answer's last byte goes (and the bytes gauge says so).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use moka::future::Cache;
use moka::notification::RemovalCause;
use moka::policy::EvictionPolicy;

use super::{CacheKey, Entry};

/// What holding an entry costs beyond its bytes and key: moka's node, its
/// map's slot and queues' links, the `Arc`s, the allocator's rounding
/// (measured at about 430 bytes: `examples/bench.rs`, "cached entries",
/// the growth of the resident set per small answer kept, less the answer
/// and its key).
pub const ENTRY_OVERHEAD: usize = 448;

/// An entry's weight against `max_bytes`.
fn weigh(_: &CacheKey, entry: &Arc<Entry>) -> u32 {
    let bytes = entry.weight() + std::mem::size_of::<CacheKey>() + ENTRY_OVERHEAD;
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

pub struct MemoryCache {
    entries: Cache<CacheKey, Arc<Entry>>,
    /// The weight held now (moka's own figure settles lazily).
    bytes: Arc<AtomicU64>,
}

impl MemoryCache {
    pub fn new(max_bytes: u64, ttl: Duration) -> Self {
        let bytes = Arc::new(AtomicU64::new(0));
        let held = Arc::clone(&bytes);
        let entries = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(weigh)
            .eviction_policy(EvictionPolicy::lru())
            .time_to_live(ttl)
            .eviction_listener(move |key: Arc<CacheKey>, entry: Arc<Entry>, cause| {
                let weight = u64::from(weigh(&key, &entry));
                let now = held
                    .fetch_sub(weight, Ordering::Relaxed)
                    .saturating_sub(weight);
                crate::metrics::CACHE_BYTES.gauge(&[]).set(now as f64);
                if cause == RemovalCause::Size {
                    crate::metrics::CACHE_EVICTIONS.counter(&[]).increment(1);
                }
            })
            .build();
        crate::metrics::CACHE_BYTES.gauge(&[]).set(0.0);
        Self { entries, bytes }
    }

    pub async fn get(&self, key: &CacheKey) -> Option<Arc<Entry>> {
        self.entries.get(key).await
    }

    pub async fn put(&self, key: CacheKey, entry: Entry) {
        let entry = Arc::new(entry);
        let weight = u64::from(weigh(&key, &entry));
        let now = self.bytes.fetch_add(weight, Ordering::Relaxed) + weight;
        crate::metrics::CACHE_BYTES.gauge(&[]).set(now as f64);
        self.entries.insert(key, entry).await;
        self.entries.run_pending_tasks().await;
    }

    /// The weight held now, for tests.
    #[cfg(test)]
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Form;

    fn entry(size: usize) -> Entry {
        Entry {
            form: Form::Json,
            content_type: String::new(),
            body: bytes::Bytes::from(vec![b'x'; size]),
        }
    }

    fn key(n: u8) -> CacheKey {
        CacheKey([n; 32])
    }

    #[tokio::test]
    async fn the_least_recently_used_entry_goes_first_and_the_bound_holds() {
        let weight = 1000 + 32 + ENTRY_OVERHEAD as u64;
        let cache = MemoryCache::new(3 * weight, Duration::from_secs(60));
        for n in 1..=3 {
            cache.put(key(n), entry(1000)).await;
        }
        assert_eq!(cache.bytes(), 3 * weight);
        // 1 was used since 2: 2 is the least recently used.
        assert!(cache.get(&key(1)).await.is_some());
        cache.put(key(4), entry(1000)).await;
        assert!(cache.get(&key(2)).await.is_none(), "evicted");
        for n in [1, 3, 4] {
            assert!(cache.get(&key(n)).await.is_some(), "{n} kept");
        }
        assert_eq!(cache.bytes(), 3 * weight);
        // Replacing an entry counts its bytes once.
        cache.put(key(4), entry(1000)).await;
        assert_eq!(cache.bytes(), 3 * weight);
    }

    #[tokio::test]
    async fn entries_expire_after_their_ttl() {
        let cache = MemoryCache::new(1 << 20, Duration::from_millis(50));
        cache.put(key(1), entry(10)).await;
        assert!(cache.get(&key(1)).await.is_some());
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(cache.get(&key(1)).await.is_none());
    }
}
