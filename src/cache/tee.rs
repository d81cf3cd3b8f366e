//! An answer's bytes collected as the relay passes them on (each chunk a
//! reference to the same buffer, nothing copied until the end), then, when
//! the answer ended complete, copied into one buffer of its own, checked
//! ([`Entry::admit`]) and stored.
//!
//! An answer larger than the cache keeps per entry stops being collected
//! at once: its chunks are let go rather than held to the end.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::{CacheKey, Entry, Form, ResponseCache};

/// Bodies larger than this are checked (parsed) on the blocking pool.
const CHECK_INLINE_BYTES: usize = 256 * 1024;

pub struct Tee {
    cache: Arc<ResponseCache>,
    key: CacheKey,
    content_type: String,
    chunks: Vec<Bytes>,
    len: usize,
    /// The answer outgrew an entry: nothing is kept.
    over: bool,
}

impl Tee {
    /// Collects an answer for `cache` under `key`, sent with `content_type`.
    pub fn new(cache: Arc<ResponseCache>, key: CacheKey, content_type: &str) -> Self {
        Self {
            cache,
            key,
            content_type: content_type.to_owned(),
            chunks: Vec::new(),
            len: 0,
            over: false,
        }
    }

    /// A chunk as the upstream sent it.
    pub fn push(&mut self, chunk: &Bytes) {
        if self.over {
            return;
        }
        self.len += chunk.len();
        if self.len > self.cache.max_entry_bytes() {
            self.over = true;
            self.chunks = Vec::new();
            return;
        }
        self.chunks.push(chunk.clone());
    }

    /// The answer ended complete, read as `form`: checks and stores it (its
    /// caller decides whether to wait for that).
    pub async fn finish(self, form: Form) {
        if self.over {
            return;
        }
        let Self {
            cache,
            key,
            content_type,
            chunks,
            len,
            ..
        } = self;
        // Copied into a buffer of its own even when it came in one chunk:
        // a chunk is a slice of the connection's read buffer, which an
        // entry kept for an hour would otherwise pin whole.
        let mut body = BytesMut::with_capacity(len);
        for chunk in &chunks {
            body.extend_from_slice(chunk);
        }
        drop(chunks);
        let body = body.freeze();
        let check = move || Entry::admit(form, &content_type, body);
        let admitted = if len > CHECK_INLINE_BYTES {
            match tokio::task::spawn_blocking(check).await {
                Ok(admitted) => admitted,
                Err(_) => return,
            }
        } else {
            check()
        };
        match admitted {
            Ok(entry) => cache.put(key, entry).await,
            Err(why) => tracing::debug!("answer not cached: {why}"),
        }
    }
}
