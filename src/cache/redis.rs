//! The shared backend: entries on the store's Redis (its connection, with
//! Cluster and Sentinel support, shared: see
//! [`crate::budget::store::RedisConnection`]), so every instance serves
//! what any of them stored.
//!
//! One key per entry, `{store.key_prefix}:cache:{hex key}`, written with
//! `SET … PX ttl` and read with `GET`: single-key commands, so any Cluster
//! slot will do and no hash tag is needed. Redis expires entries itself;
//! its own `maxmemory-policy` decides what goes when it is full. A command
//! that fails or takes longer than `store.timeout_ms` is a miss (or an
//! answer not kept), logged: the client never sees it.

use std::time::Duration;

use bytes::Bytes;

use super::{CacheKey, Entry};
use crate::budget::store::RedisConnection;

/// The store's Redis, as the cache uses it.
#[derive(Clone)]
pub struct RedisLink {
    pub connection: RedisConnection,
    /// `store.key_prefix`.
    pub prefix: String,
    /// `store.timeout_ms`: the longest a lookup may add to a request.
    pub timeout: Duration,
}

pub struct RedisCache {
    link: RedisLink,
    ttl: Duration,
}

impl RedisCache {
    pub fn new(link: RedisLink, ttl: Duration) -> Self {
        Self { link, ttl }
    }

    fn key(&self, key: &CacheKey) -> String {
        format!("{}:cache:{}", self.link.prefix, key.hex())
    }

    pub async fn get(&self, key: &CacheKey) -> Option<Entry> {
        let mut connection = self.link.connection.clone();
        let mut command = redis::cmd("GET");
        command.arg(self.key(key));
        let get = command.query_async::<Option<Vec<u8>>>(&mut connection);
        match tokio::time::timeout(self.link.timeout, get).await {
            Ok(Ok(found)) => found.and_then(|bytes| Entry::decode(Bytes::from(bytes))),
            Ok(Err(e)) => {
                tracing::warn!("response cache: Redis lookup failed, served as a miss: {e}");
                None
            }
            Err(_) => {
                tracing::warn!("response cache: Redis lookup timed out, served as a miss");
                None
            }
        }
    }

    pub async fn put(&self, key: &CacheKey, entry: &Entry) {
        let ttl_ms = u64::try_from(self.ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let mut connection = self.link.connection.clone();
        let mut command = redis::cmd("SET");
        command
            .arg(self.key(key))
            .arg(entry.encode())
            .arg("PX")
            .arg(ttl_ms);
        let set = command.query_async::<()>(&mut connection);
        match tokio::time::timeout(self.link.timeout, set).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("response cache: Redis did not keep an answer: {e}"),
            Err(_) => tracing::warn!("response cache: Redis did not keep an answer in time"),
        }
    }
}
