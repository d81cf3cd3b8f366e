//! Applies an upstream's image policy to a chat request: every `image_url`
//! part of every message is inlined, validated, converted or stripped of
//! `detail` as that upstream needs, so clients never have to know.
//!
//! The work per image lives in [`crate::images`]; this module decides which
//! work each image gets, runs the images of one request concurrently (with a
//! bound), and names the failing image in the error's `param`. A request
//! tried on several upstreams fetches each image once ([`ImageWork`]) and
//! renders it for each upstream's policy.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt, stream};
use tracing::Instrument;

use base64::Engine as _;
use sha2::{Digest, Sha256};

use crate::images::data_uri::{DataUri, is_data_uri};
use crate::images::inline::BASE64;
use crate::images::{
    ErrorKind, FetchedImage, ImageError, ImagePolicy, Images, Target, held_or_copied,
};
use crate::openai::chat::{ChatRequest, ImageAt};

/// An image of the request refused or failed, and which one.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{param}: {error}")]
pub struct ImageRefusal {
    pub param: ImageAt,
    pub error: ImageError,
}

/// Images of one request processed at once. Enough to hide the latency of
/// several slow image hosts; few enough that one request cannot open
/// dozens of connections.
pub const CONCURRENT_IMAGES_PER_REQUEST: usize = 8;

/// What OpenAI's `detail: "low"` means: the model sees at most 512x512.
pub const LOW_DETAIL_SIDE: u32 = 512;

/// What happens to one image.
enum Work<'r> {
    /// Fetch an image URL and inline it.
    Fetch(&'r str),
    /// Validate (and maybe convert) a client's data URI.
    Data(&'r str),
}

/// Rewrites `request`'s images for an upstream with `policy`, for a request
/// sent once.
pub async fn apply_image_policy(
    images: &Images,
    policy: &ImagePolicy,
    request: &mut ChatRequest<'_>,
    received: &Bytes,
) -> Result<(), ImageRefusal> {
    ImageWork::new(images, received)
        .apply(policy, request)
        .await
}

/// The image work of one request, kept across its attempts: each image URL
/// is fetched once, whatever the cache does, and rendered per upstream.
pub struct ImageWork<'i> {
    images: &'i Images,
    /// The body the request was parsed from: a client's data URI is read
    /// from it on the blocking pool, never copied out of it.
    received: Bytes,
    fetched: Mutex<HashMap<String, Arc<FetchedImage>>>,
}

impl<'i> ImageWork<'i> {
    pub fn new(images: &'i Images, received: &Bytes) -> Self {
        Self {
            images,
            received: received.clone(),
            fetched: Mutex::default(),
        }
    }

    /// Rewrites `request`'s images for an upstream with `policy`. Refuses
    /// the whole request on the first image that fails, naming that image.
    pub async fn apply(
        &self,
        policy: &ImagePolicy,
        request: &mut ChatRequest<'_>,
    ) -> Result<(), ImageRefusal> {
        apply(self, policy, request).await
    }

    /// How many image URLs were fetched (or found in the cache) for this
    /// request, and their bytes as fetched.
    pub fn fetched(&self) -> (u32, u64) {
        self.fetched.lock().map_or((0, 0), |fetched| {
            let count = u32::try_from(fetched.len()).unwrap_or(u32::MAX);
            let bytes = fetched.values().map(|image| image.bytes.len() as u64).sum();
            (count, bytes)
        })
    }

    /// What each image of `request` is, in order, for the response cache's
    /// key: the SHA-256 of its bytes, or `None` where its URL stands for
    /// itself. A `data:` URI is decoded; an `http(s)` URL is fetched when
    /// `fetch` (the model's upstreams all inline images, so the fetch is
    /// one the request makes anyway: its attempts reuse it), else it is
    /// keyed as written. A fetch that fails refuses the request as the
    /// rewrite would, with the same error; a `data:` URI that does not
    /// decode is left to the rewrite to refuse.
    pub async fn digests(
        &self,
        request: &ChatRequest<'_>,
        fetch: bool,
    ) -> Result<Vec<Option<[u8; 32]>>, ImageRefusal> {
        if request.image_count() == 0 {
            return Ok(Vec::new());
        }
        check_count(self.images, request)?;
        let pending: Vec<_> = request
            .images()
            .map(|(param, image)| self.digest(param, &image.url, fetch))
            .collect();
        stream::iter(pending)
            .buffered(CONCURRENT_IMAGES_PER_REQUEST)
            .try_collect()
            .await
    }

    async fn digest(
        &self,
        param: ImageAt,
        url: &str,
        fetch: bool,
    ) -> Result<Option<[u8; 32]>, ImageRefusal> {
        if is_data_uri(url) {
            let Ok(uri) = DataUri::parse(url) else {
                return Ok(None);
            };
            if !uri.base64 {
                return Ok(None);
            }
            let payload = held_or_copied(&self.received, uri.data);
            return Ok(offloaded(payload.len(), move || {
                BASE64.decode(payload).ok().map(|bytes| sha256(&bytes))
            })
            .await);
        }
        if !fetch {
            return Ok(None);
        }
        let image = self.fetch(url).await.map_err(|e| refusal(e, param))?;
        let bytes = image.bytes.clone();
        Ok(offloaded(bytes.len(), move || Some(sha256(&bytes))).await)
    }

    /// The image at `url`, fetched for this request already or now.
    async fn fetch(&self, url: &str) -> Result<Arc<FetchedImage>, ImageError> {
        let known = self
            .fetched
            .lock()
            .ok()
            .and_then(|fetched| fetched.get(url).cloned());
        if let Some(image) = known {
            return Ok(image);
        }
        let span = crate::traces::image_fetch_span(url);
        let image = self
            .images
            .fetch(url)
            .instrument(span.clone())
            .await
            .inspect_err(|e| crate::traces::record_image_failure(&span, e.reason))?;
        if let Ok(mut fetched) = self.fetched.lock() {
            fetched.insert(url.to_owned(), Arc::clone(&image));
        }
        Ok(image)
    }
}

/// Refuses a request with more images than `images` accepts, naming the
/// first one too many: before any fetch starts.
fn check_count(images: &Images, request: &ChatRequest<'_>) -> Result<(), ImageRefusal> {
    let count = request.image_count();
    let max = images.max_images_per_request();
    if count <= max {
        return Ok(());
    }
    let param = request
        .images()
        .nth(max)
        .map(|(at, _)| at)
        .unwrap_or(ImageAt {
            message: 0,
            part: 0,
        });
    Err(refusal(
        ImageError::new(
            ErrorKind::TooMany,
            "count",
            format!("This request has {count} images; at most {max} are accepted per request."),
        ),
        param,
    ))
}

async fn apply(
    work: &ImageWork<'_>,
    policy: &ImagePolicy,
    request: &mut ChatRequest<'_>,
) -> Result<(), ImageRefusal> {
    let images = work.images;
    let count = request.image_count();
    if count == 0 {
        return Ok(());
    }
    check_count(images, request)?;

    let jobs: Vec<(usize, ImageAt, Work<'_>, Target)> = request
        .images()
        .enumerate()
        .filter_map(|(index, (param, image))| {
            let low = image
                .detail
                .as_deref()
                .is_some_and(|d| d.eq_ignore_ascii_case("low"));
            let target = Target {
                formats: policy.formats,
                max_bytes: policy.max_image_bytes,
                // Only where `detail` is stripped must Iris carry out its
                // meaning; elsewhere the upstream does.
                max_side: (policy.strip_detail && low).then_some(LOW_DETAIL_SIDE),
            };
            let url: &str = &image.url;
            let work = if is_data_uri(url) {
                Work::Data(url)
            } else if policy.inline {
                Work::Fetch(url)
            } else {
                // The upstream fetches URLs itself: they go as sent.
                return None;
            };
            Some((index, param, work, target))
        })
        .collect();

    let mut replacements: Vec<Option<Replacement>> = Vec::new();
    if !jobs.is_empty() {
        replacements.resize_with(count, || None);
        // Futures built up front and polled at most N at a time. (A named
        // async fn rather than a closure: closures over borrowed jobs trip
        // the compiler's higher-ranked lifetime inference.)
        let pending: Vec<_> = jobs.into_iter().map(|job| process(work, job)).collect();
        let done: Vec<(usize, Option<Replacement>)> = stream::iter(pending)
            .buffer_unordered(CONCURRENT_IMAGES_PER_REQUEST)
            .try_collect()
            .await?;
        for (index, replacement) in done {
            replacements[index] = replacement;
        }
    }

    if replacements.is_empty() && !policy.strip_detail {
        return Ok(());
    }
    let mut replacements = replacements.into_iter();
    for (_, image) in request.images_mut() {
        if let Some(url) = replacements.next().flatten() {
            image.set_url_shared(url);
        }
        if policy.strip_detail {
            image.strip_detail();
        }
    }
    Ok(())
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Bytes of image beyond which hashing or decoding goes to the blocking
/// pool (a few hundred microseconds of work).
const INLINE_DIGEST_BYTES: usize = 256 * 1024;

/// Runs `work` over `len` bytes here, or on the blocking pool when large.
async fn offloaded<T: Send + 'static>(
    len: usize,
    work: impl FnOnce() -> Option<T> + Send + 'static,
) -> Option<T> {
    if len <= INLINE_DIGEST_BYTES {
        return work();
    }
    tokio::task::spawn_blocking(work).await.ok().flatten()
}

/// A new URL for an image part: a data URI Iris wrote (held by the image
/// cache, or by this request alone), sent upstream without a copy.
type Replacement = Arc<String>;

/// One image's work; the replacement URL, if it changes.
async fn process(
    images: &ImageWork<'_>,
    (index, param, work, target): (usize, ImageAt, Work<'_>, Target),
) -> Result<(usize, Option<Replacement>), ImageRefusal> {
    let result = match work {
        Work::Fetch(url) => match images.fetch(url).await {
            Ok(image) => images.images.render(url, &image, target).await.map(Some),
            Err(e) => Err(e),
        },
        Work::Data(uri) => images
            .images
            .process_data_uri(uri, &images.received, target)
            .await
            .map(|uri| uri.map(Arc::new)),
    };
    result
        .map(|replacement| (index, replacement))
        .map_err(|e| refusal(e, param))
}

/// The refusal of one image, counted and logged by reason. Neither the
/// metric nor the log carries the URL.
fn refusal(error: ImageError, param: ImageAt) -> ImageRefusal {
    let code = error.kind.code().as_str();
    crate::metrics::IMAGE_REFUSALS
        .counter(&[("code", code), ("reason", error.reason)])
        .increment(1);
    tracing::info!(code, reason = error.reason, param = %param, "image refused");
    ImageRefusal { param, error }
}
