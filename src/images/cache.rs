//! The image cache: fetched images (bytes and data URI) by URL, and
//! converted data URIs by URL and upstream policy, in one bounded store
//! weighed in bytes.
//!
//! Both layers load through moka's coalescing insert, so concurrent requests
//! for one URL fetch it once (single flight) and a popular image is converted
//! once per policy. Failures are not cached: the next request tries again.

use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use moka::future::Cache;

use super::ImageError;
use super::convert::Target;
use super::sniff::Format;

/// A fetched image that passed inspection: a recognised format with a
/// readable header within the pixel cap.
#[derive(Debug)]
pub struct FetchedImage {
    /// The body as the server sent it (without its metadata where
    /// `images.strip_metadata` is on).
    pub bytes: Bytes,
    /// `data:<mime>;base64,<bytes>`: what upstreams that take the image as
    /// it is receive, shared by every request rather than re-encoded.
    pub data_uri: Arc<String>,
    pub format: Format,
    pub width: u32,
    pub height: u32,
    /// Whether its pixel data decodes whole, found out once, when it is
    /// first forwarded as it is (an image converted for an upstream is
    /// decoded by its conversion, which proves the same: it is not decoded
    /// twice).
    pub checked: tokio::sync::OnceCell<Result<(), super::ImageError>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Fetched(Arc<str>),
    Rendered(Arc<str>, Target),
}

#[derive(Debug, Clone)]
enum Value {
    Fetched(Arc<FetchedImage>),
    Rendered(Arc<String>),
}

/// Bookkeeping per entry, so that many tiny entries still count.
const ENTRY_OVERHEAD: usize = 256;

fn weigh(key: &Key, value: &Value) -> u32 {
    let key_len = match key {
        Key::Fetched(url) | Key::Rendered(url, _) => url.len(),
    };
    let value_len = match value {
        Value::Fetched(image) => image.bytes.len() + image.data_uri.len(),
        Value::Rendered(uri) => uri.len(),
    };
    u32::try_from(key_len + value_len + ENTRY_OVERHEAD).unwrap_or(u32::MAX)
}

/// `None` when `cache_bytes = 0`: every request fetches.
#[derive(Clone)]
pub struct ImageCache {
    inner: Option<Cache<Key, Value>>,
}

impl ImageCache {
    pub fn new(max_bytes: u64, ttl: Duration) -> Self {
        let inner = (max_bytes > 0).then(|| {
            Cache::builder()
                .max_capacity(max_bytes)
                .weigher(weigh)
                .time_to_live(ttl)
                .build()
        });
        Self { inner }
    }

    /// The fetched image for `url`, loading it with `load` on a miss.
    pub async fn fetched(
        &self,
        url: &str,
        load: impl Future<Output = Result<Arc<FetchedImage>, ImageError>>,
    ) -> Result<Arc<FetchedImage>, ImageError> {
        let value = self
            .get_or_load(Key::Fetched(Arc::from(url)), "fetched", async {
                load.await.map(Value::Fetched)
            })
            .await?;
        match value {
            Value::Fetched(image) => Ok(image),
            Value::Rendered(_) => Err(mixed_up()),
        }
    }

    /// The converted data URI of `url` for `target`, rendering it with
    /// `render` on a miss.
    pub async fn rendered(
        &self,
        url: &str,
        target: Target,
        render: impl Future<Output = Result<Arc<String>, ImageError>>,
    ) -> Result<Arc<String>, ImageError> {
        let value = self
            .get_or_load(Key::Rendered(Arc::from(url), target), "rendered", async {
                render.await.map(Value::Rendered)
            })
            .await?;
        match value {
            Value::Rendered(uri) => Ok(uri),
            Value::Fetched(_) => Err(mixed_up()),
        }
    }

    async fn get_or_load(
        &self,
        key: Key,
        layer: &'static str,
        load: impl Future<Output = Result<Value, ImageError>>,
    ) -> Result<Value, ImageError> {
        let Some(cache) = &self.inner else {
            return load.await;
        };
        let entry = cache
            .entry(key)
            .or_try_insert_with(load)
            .await
            .map_err(|e| (*e).clone())?;
        // Not fresh: it was cached, or another request loaded it meanwhile.
        let outcome = if entry.is_fresh() { "miss" } else { "hit" };
        crate::metrics::IMAGE_CACHE
            .counter(&[("layer", layer), ("outcome", outcome)])
            .increment(1);
        Ok(entry.into_value())
    }

    /// Bytes held, for tests and metrics (moka settles its counters lazily).
    pub async fn weighted_size(&self) -> u64 {
        match &self.inner {
            Some(cache) => {
                cache.run_pending_tasks().await;
                cache.weighted_size()
            }
            None => 0,
        }
    }
}

/// Keys of one layer only ever hold that layer's values; kept as an error
/// rather than a panic all the same.
fn mixed_up() -> ImageError {
    ImageError::new(
        super::ErrorKind::FetchFailed,
        "internal",
        "The image cache returned an unexpected entry.",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn image(len: usize) -> Arc<FetchedImage> {
        Arc::new(FetchedImage {
            bytes: Bytes::from(vec![0u8; len]),
            data_uri: Arc::new(String::new()),
            format: Format::Png,
            width: 1,
            height: 1,
            checked: tokio::sync::OnceCell::new(),
        })
    }

    #[tokio::test]
    async fn concurrent_loads_of_one_url_run_once() {
        let cache = ImageCache::new(1 << 20, Duration::from_secs(60));
        let loads = AtomicUsize::new(0);
        let load = || async {
            loads.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok(image(10))
        };
        let (a, b, c) = tokio::join!(
            cache.fetched("http://x/a", load()),
            cache.fetched("http://x/a", load()),
            cache.fetched("http://x/a", load()),
        );
        assert!(a.is_ok() && b.is_ok() && c.is_ok());
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        cache.fetched("http://x/a", load()).await.expect("cached");
        assert_eq!(loads.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn failures_are_not_cached_and_size_is_bounded() {
        let cache = ImageCache::new(10_000, Duration::from_secs(60));
        let failed = cache
            .fetched("http://x/a", async {
                Err(ImageError::new(
                    super::super::ErrorKind::FetchFailed,
                    "status",
                    "no",
                ))
            })
            .await;
        assert!(failed.is_err());
        cache
            .fetched("http://x/a", async { Ok(image(10)) })
            .await
            .expect("retried");
        for i in 0..20 {
            let _ = cache
                .fetched(&format!("http://x/{i}"), async { Ok(image(2_000)) })
                .await;
        }
        assert!(cache.weighted_size().await <= 10_000);

        let disabled = ImageCache::new(0, Duration::from_secs(60));
        let loads = AtomicUsize::new(0);
        for _ in 0..2 {
            disabled
                .fetched("http://x/a", async {
                    loads.fetch_add(1, Ordering::SeqCst);
                    Ok(image(1))
                })
                .await
                .expect("loaded");
        }
        assert_eq!(loads.load(Ordering::SeqCst), 2);
    }
}
