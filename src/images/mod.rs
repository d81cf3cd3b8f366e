//! Images: fetching URLs safely, sniffing, converting, resizing and caching,
//! and turning the result into a `data:` URI. Knows nothing of HTTP routing
//! or of chat requests; [`crate::rewrite`] applies it to those.
//!
//! - [`address_policy`]: which addresses may be fetched (pure, table-tested)
//! - [`fetch`]: the SSRF-safe fetcher (filtering resolver, checked redirects, limits)
//! - [`sniff`]: format and dimensions from the bytes
//! - [`data_uri`]: the one RFC 2397 parser
//! - [`inline`]: data URIs, written as the body streams in, or checked
//! - [`convert`]: decode (to validate), convert, downscale, fit under a byte size
//! - [`memory`]: what each of those holds, from the header, and the budget of it
//! - [`metadata`]: EXIF/XMP removed without re-encoding
//! - [`cache`]: bounded, byte-weighed, single-flight

pub mod address_policy;
pub mod cache;
pub mod convert;
pub mod data_uri;
pub mod fetch;
pub mod inline;
pub mod memory;
pub mod metadata;
pub mod sniff;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use tokio::sync::Semaphore;

use crate::error_code::ErrorCode;
use address_policy::AddressPolicy;
pub use cache::FetchedImage;
use cache::ImageCache;
pub use convert::Target;
pub use fetch::FetchLimits;
use fetch::{Fetcher, Lookup, SystemLookup};
pub use inline::data_uri;
use inline::{BASE64, InliningSink};
use ipnet::IpNet;
use memory::{DecodeBudget, Layout};
pub use sniff::{Format, FormatSet, dimensions};

/// The kinds of image failure, each with its error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Scheme, userinfo, refused address, redirect to one.
    Forbidden,
    /// DNS, connect, HTTP status, timeout, redirect limit.
    FetchFailed,
    /// Over `max_bytes` or `max_pixels`, or cannot fit `max_image_bytes`.
    TooLarge,
    /// Not an image, or no format the upstream takes can be made of it.
    FormatUnsupported,
    /// A malformed data URI or base64.
    InvalidData,
    TooMany,
}

impl ErrorKind {
    pub fn code(self) -> ErrorCode {
        match self {
            ErrorKind::Forbidden => ErrorCode::ImageUrlForbidden,
            ErrorKind::FetchFailed => ErrorCode::ImageFetchFailed,
            ErrorKind::TooLarge => ErrorCode::ImageTooLarge,
            ErrorKind::FormatUnsupported => ErrorCode::ImageFormatUnsupported,
            ErrorKind::InvalidData => ErrorCode::InvalidImageData,
            ErrorKind::TooMany => ErrorCode::TooManyImages,
        }
    }
}

/// An image refused or failed: its kind, a short machine reason (a metric
/// label such as `loopback` or `timeout`) and a message for the client that
/// names no query string.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {message}", kind.code())]
pub struct ImageError {
    pub kind: ErrorKind,
    pub reason: &'static str,
    pub message: String,
}

impl ImageError {
    pub fn new(kind: ErrorKind, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind,
            reason,
            message: message.into(),
        }
    }
}

/// The `[images]` settings: limits for every image, fetched or sent inline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImagesSettings {
    pub fetch: FetchLimits,
    pub max_images_per_request: usize,
    /// Decoded width×height above this is refused, judged from the header.
    pub max_pixels: u64,
    /// Networks that bypass the private-address block (an internal image host).
    pub allowed_networks: Vec<IpNet>,
    /// 0 disables the cache of fetched images.
    pub cache_bytes: u64,
    pub cache_ttl: Duration,
    /// Remove EXIF (GPS included), XMP and text metadata from every image
    /// forwarded (see [`metadata`]).
    pub strip_metadata: bool,
    /// Bytes of pixels in flight across the process: what every decode,
    /// conversion and downscale running at once may hold together
    /// ([`memory`]).
    pub max_decode_bytes: u64,
}

impl Default for ImagesSettings {
    fn default() -> Self {
        Self {
            fetch: FetchLimits {
                timeout: Duration::from_secs(10),
                max_bytes: 20 * 1024 * 1024,
                max_redirects: 3,
            },
            max_images_per_request: 16,
            max_pixels: 50_000_000,
            allowed_networks: Vec::new(),
            cache_bytes: 64 * 1024 * 1024,
            cache_ttl: Duration::from_secs(300),
            strip_metadata: false,
            max_decode_bytes: DEFAULT_MAX_DECODE_BYTES,
        }
    }
}

/// The default `images.max_decode_bytes`: half of the deploy kit's 1 GiB
/// pod limit. The images of the default `max_pixels` (50 million) that need
/// most take it whole and run alone (a 16-bit RGB PNG converted: 9 bytes a
/// pixel, 450 MB), most real images run several at a time (a 12 MP photo
/// fitted under `max_image_bytes`: about 130 MB), and the other half is left
/// to the process (request bodies, the image cache, buffers).
pub const DEFAULT_MAX_DECODE_BYTES: u64 = 512 * 1024 * 1024;

/// What one upstream accepts, applied to every image part sent to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImagePolicy {
    /// Remote image URLs become `data:` URIs (the upstream cannot fetch).
    pub inline: bool,
    /// Remove `image_url.detail` (`"low"` first downscales, where Iris fetches).
    pub strip_detail: bool,
    /// Formats the upstream accepts; others are converted.
    pub formats: FormatSet,
    /// Re-encode or downscale larger images until they fit.
    pub max_image_bytes: Option<usize>,
}

impl Default for ImagePolicy {
    fn default() -> Self {
        Self {
            inline: false,
            strip_detail: false,
            formats: FormatSet::of(&[Format::Jpeg, Format::Png, Format::Webp, Format::Gif]),
            max_image_bytes: None,
        }
    }
}

/// Below this many bytes, decoding base64 is cheaper than a hop to the blocking pool.
const INLINE_CODEC_BYTES: usize = 256 * 1024;

/// The image service: one per process, shared by every request.
pub struct Images {
    fetcher: Fetcher,
    cache: ImageCache,
    max_bytes: usize,
    max_pixels: u64,
    max_images_per_request: usize,
    strip_metadata: bool,
    /// Bounds the CPU-heavy jobs (decode, convert, resize, big base64) to one
    /// per core, so a burst of large images queues instead of thrashing.
    cpu: Arc<Semaphore>,
    /// Bounds the memory of the jobs that touch pixels, whatever the cores.
    budget: Arc<DecodeBudget>,
}

impl Images {
    pub fn new(settings: &ImagesSettings) -> Result<Self, String> {
        Self::with_lookup(settings, Arc::new(SystemLookup))
    }

    /// With a resolver of the caller's choosing; tests use a table to point
    /// names at loopback addresses.
    pub fn with_lookup(settings: &ImagesSettings, lookup: Arc<dyn Lookup>) -> Result<Self, String> {
        describe_metrics();
        memory::describe_metrics();
        let policy = Arc::new(AddressPolicy::from_networks(
            settings.allowed_networks.clone(),
        ));
        let fetcher = Fetcher::with_lookup(policy, settings.fetch, lookup)?;
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Ok(Self {
            fetcher,
            cache: ImageCache::new(settings.cache_bytes, settings.cache_ttl),
            max_bytes: settings.fetch.max_bytes,
            max_pixels: settings.max_pixels,
            max_images_per_request: settings.max_images_per_request,
            strip_metadata: settings.strip_metadata,
            cpu: Arc::new(Semaphore::new(cores)),
            budget: Arc::new(DecodeBudget::new(settings.max_decode_bytes)),
        })
    }

    /// The image service for new settings, replacing `previous` (a reload):
    /// when the budget's size is unchanged, the budget and the cores are
    /// shared with it, so jobs still running under the old service count
    /// against the same bytes as the new service's.
    pub fn succeeding(previous: &Images, settings: &ImagesSettings) -> Result<Self, String> {
        let mut images = Self::new(settings)?;
        if previous.budget.bytes() == images.budget.bytes() {
            images.budget = Arc::clone(&previous.budget);
            images.cpu = Arc::clone(&previous.cpu);
        }
        Ok(images)
    }

    pub fn max_images_per_request(&self) -> usize {
        self.max_images_per_request
    }

    pub fn cache(&self) -> &ImageCache {
        &self.cache
    }

    /// Fetches an `http(s)` URL (through the cache) and returns it as a
    /// `data:` URI meeting `target`. When the image already meets it, the
    /// URI carries exactly the fetched bytes, encoded while they arrived.
    pub async fn inline_url(&self, url: &str, target: Target) -> Result<Arc<String>, ImageError> {
        let image = self.fetch(url).await?;
        self.render(url, &image, target).await
    }

    /// Fetches an `http(s)` URL through the cache (one fetch for concurrent
    /// requests of the same URL), inspected and base64-encoded as it
    /// arrives. Its pixel data is proven later, once: by the conversion
    /// that decodes it for an upstream that does not take it as it is, or
    /// by [`Self::check`] the first time it is forwarded as it is. With
    /// `strip_metadata` it is checked (and stripped) here, before it is
    /// cached: its size without metadata decides whether an upstream takes
    /// it as it is.
    ///
    /// One deadline per request, from its start, whether it fetches, waits
    /// on another request's fetch of the URL, or takes that fetch over when
    /// the other's client hangs up: an image is never waited on longer than
    /// fetching it alone may take.
    pub async fn fetch(&self, url: &str) -> Result<Arc<FetchedImage>, ImageError> {
        let deadline = tokio::time::Instant::now() + self.fetcher.limits().timeout;
        let fetched = self.cache.fetched(url, async {
            let mut sink = InliningSink::new(self.max_pixels);
            self.fetcher.fetch_into_by(url, &mut sink, deadline).await?;
            let mut image = sink.finish()?;
            if self.strip_metadata {
                let dims = (image.width, image.height);
                if let Some(stripped) = self.check(image.bytes.clone(), image.format, dims).await? {
                    image.data_uri = Arc::new(data_uri(image.format, &stripped));
                    image.bytes = Bytes::from(stripped);
                }
                let _ = image.checked.set(Ok(()));
            }
            Ok(Arc::new(image))
        });
        // Fetching itself, the request's own timeout answers first (it is
        // polled inside this one): this one ends only a wait.
        match tokio::time::timeout_at(deadline, fetched).await {
            Ok(result) => result,
            Err(_) => Err(self.fetcher.timed_out(url)),
        }
    }

    /// The `data:` URI of a fetched `image` (from `url`) meeting `target`:
    /// its own when it does (its pixel data checked first, once per
    /// image), else converted (once per URL and target, then cached).
    pub async fn render(
        &self,
        url: &str,
        image: &Arc<FetchedImage>,
        target: Target,
    ) -> Result<Arc<String>, ImageError> {
        let dims = (image.width, image.height);
        if target.accepts(image.format, image.bytes.len(), dims) {
            image
                .checked
                .get_or_init(|| async {
                    self.check(image.bytes.clone(), image.format, dims)
                        .await
                        .map(|_| ())
                })
                .await
                .clone()?;
            return Ok(Arc::clone(&image.data_uri));
        }
        self.cache
            .rendered(url, target, async {
                self.convert(image.bytes.clone(), image.format, dims, target)
                    .await
                    .map(Arc::new)
            })
            .await
    }

    /// Validates a client's `data:` URI and makes it meet `target`. `None`
    /// means it already does and may be forwarded exactly as sent.
    /// `received`: the body the URI was parsed from, if it is still there
    /// (a large payload is decoded from it, not from a copy).
    pub async fn process_data_uri(
        &self,
        uri: &str,
        received: &Bytes,
        target: Target,
    ) -> Result<Option<String>, ImageError> {
        let uri = inline::checked_data_uri(uri)?;
        let payload = uri.data;
        // Decoded size from the encoded length, before decoding anything.
        let decoded_len = payload.len() / 4 * 3 + (payload.len() % 4).saturating_sub(1);
        if decoded_len > self.max_bytes + 2 {
            return Err(self.too_many_bytes());
        }
        let bytes = if payload.len() > INLINE_CODEC_BYTES {
            let held = held_or_copied(received, payload);
            self.blocking(0, move || BASE64.decode(held)).await?
        } else {
            BASE64.decode(payload)
        }
        .map_err(|e| {
            ImageError::new(
                ErrorKind::InvalidData,
                "base64",
                format!("The data URI's base64 is invalid: {e}."),
            )
        })?;
        if bytes.len() > self.max_bytes {
            return Err(self.too_many_bytes());
        }
        let (format, dims) = inline::inspect(&bytes, self.max_pixels)?;
        let bytes = Bytes::from(bytes);
        if target.accepts(format, bytes.len(), dims) {
            if let Some(stripped) = self.check(bytes, format, dims).await? {
                return Ok(Some(data_uri(format, &stripped)));
            }
            if uri.declares(format.mime()) {
                return Ok(None);
            }
            // The right bytes under the wrong type: only the type changes.
            let prefix = inline::data_uri_prefix(format);
            let mut fixed = String::with_capacity(prefix.len() + payload.len());
            fixed.push_str(&prefix);
            fixed.push_str(payload);
            return Ok(Some(fixed));
        }
        // Converting decodes (and so validates) it, and drops its metadata.
        self.convert(bytes, format, dims, target).await.map(Some)
    }

    /// Decodes an image to be forwarded as it is, off the async threads,
    /// to prove its pixel data whole; with `strip_metadata`, its bytes
    /// without metadata (`None`: forward them as they are).
    async fn check(
        &self,
        bytes: Bytes,
        format: Format,
        dims: (u32, u32),
    ) -> Result<Option<Vec<u8>>, ImageError> {
        let (max_pixels, strip) = (self.max_pixels, self.strip_metadata);
        // A JPEG's check reads headers and walks the scans: no pixels, so
        // no share of the decode budget. Everything else decodes whole.
        let layout = (format != Format::Jpeg).then(|| Layout::of(&bytes, format, dims));
        let need = layout.map_or(0, |layout| layout.decode_need());
        let allowance = layout.map_or(convert::DecodeAllowance::UNLIMITED, |layout| {
            layout.allowance()
        });
        // A small JPEG's check (tens of microseconds) is cheaper than the
        // hop, and must not queue behind conversions for a core.
        let here = format == Format::Jpeg && bytes.len() <= INLINE_CODEC_BYTES;
        let work = move || {
            count_decode("check");
            let orientation = convert::validate(&bytes, format, max_pixels, allowance)?;
            Ok(strip
                .then(|| metadata::strip(&bytes, format, orientation))
                .flatten())
        };
        if here {
            return work();
        }
        self.blocking(need, work).await?
    }

    fn too_many_bytes(&self) -> ImageError {
        ImageError::new(
            ErrorKind::TooLarge,
            "bytes",
            format!("The image is larger than {} bytes.", self.max_bytes),
        )
    }

    /// Converts, downscales or shrinks an inspected image that does not meet
    /// `target`, off the async threads, into its data URI.
    async fn convert(
        &self,
        bytes: Bytes,
        format: Format,
        dims: (u32, u32),
        target: Target,
    ) -> Result<String, ImageError> {
        let max_pixels = self.max_pixels;
        let why = if !target.formats.contains(format) {
            "format"
        } else if target
            .max_side
            .is_some_and(|max| dims.0 > max || dims.1 > max)
        {
            "detail_low"
        } else {
            "max_image_bytes"
        };
        let layout = Layout::of(&bytes, format, dims);
        let (need, allowance) = (layout.transform_need(&target), layout.allowance());
        let result = self
            .blocking(need, move || {
                count_decode("convert");
                convert::transform(&bytes, format, &target, max_pixels, allowance)
                    .map(|encoded| (encoded.format, data_uri(encoded.format, &encoded.bytes)))
            })
            .await?;
        let to = result.as_ref().map_or("failed", |(to, _)| to.name());
        crate::metrics::IMAGE_CONVERSIONS
            .counter(&[("from", format.name()), ("to", to), ("reason", why)])
            .increment(1);
        tracing::debug!(from = format.name(), to, reason = why, "image converted");
        result.map(|(_, uri)| uri)
    }

    /// Runs CPU-heavy work on the blocking pool: at most one job per core,
    /// and only once `need` bytes (0 for work that holds no pixels) are
    /// reserved in the decode budget.
    ///
    /// Memory first, then a core: a job waiting for memory holds nothing,
    /// and a job holding a core has all the memory it needs and finishes,
    /// so neither wait can close a cycle (no deadlock), and cores never
    /// idle behind a wait for memory. Both waits are fair (first come,
    /// first served, a large need included), so a large image cannot be
    /// starved by small ones. Until the job starts, every wait belongs to
    /// the request: a client that hangs up drops it, and whatever it held.
    async fn blocking<T: Send + 'static>(
        &self,
        need: u64,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ImageError> {
        let internal = || {
            ImageError::new(
                ErrorKind::FormatUnsupported,
                "internal",
                "The image could not be processed.",
            )
        };
        let memory = if need > 0 {
            Some(self.budget.reserve(need).await.ok_or_else(internal)?)
        } else {
            None
        };
        let core = Arc::clone(&self.cpu)
            .acquire_owned()
            .await
            .map_err(|_| internal())?;
        tokio::task::spawn_blocking(move || {
            // Held by the job itself: a cancelled request does not free the
            // core or the memory its conversion is still using.
            let _held = (core, memory);
            work()
        })
        .await
        .map_err(|_| internal())
    }
}

/// `text` as bytes that outlive the request's borrow, for work on the
/// blocking pool: a slice of `received` when it lies there (a client's
/// data URI is not copied), else a copy.
pub fn held_or_copied(received: &Bytes, text: &str) -> Bytes {
    crate::openai::spliced::slice_of(received, text.as_bytes())
        .unwrap_or_else(|| Bytes::copy_from_slice(text.as_bytes()))
}

fn describe_metrics() {
    metrics::describe_counter!(
        "iris_image_fetches_total",
        "Image URL fetches, by result (ok or the error code)."
    );
    metrics::describe_counter!(
        "iris_image_fetched_bytes_total",
        metrics::Unit::Bytes,
        "Bytes of image bodies fetched."
    );
    metrics::describe_histogram!(
        "iris_image_fetch_duration_seconds",
        metrics::Unit::Seconds,
        "Time to fetch one image URL, redirects included."
    );
    metrics::describe_counter!(
        "iris_image_cache_total",
        "Image cache lookups, by layer (fetched, rendered) and outcome (hit, miss)."
    );
    metrics::describe_counter!(
        "iris_image_conversions_total",
        "Images re-encoded, by source format, output format and reason."
    );
    metrics::describe_counter!(
        "iris_image_refusals_total",
        "Images refused, by error code and reason."
    );
}

/// A real black PNG of `width`×`height`, for tests across the crate.
#[cfg(test)]
pub(crate) fn test_png(width: u32, height: u32) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(image::RgbImage::new(width, height))
        .write_to(&mut out, image::ImageFormat::Png)
        .expect("png");
    out.into_inner()
}

/// One decode of an image's pixel data, for `purpose` (`check`, `convert`).
fn count_decode(purpose: &str) {
    crate::metrics::IMAGE_DECODES
        .counter(&[("purpose", purpose)])
        .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A data URI still in the received body is handed to the blocking
    /// pool as a slice of it; text from elsewhere is copied.
    #[test]
    fn a_payload_in_the_received_body_is_held_not_copied() {
        let received = Bytes::from_static(b"{\"url\":\"data:image/png;base64,AAAA\"}");
        let text = std::str::from_utf8(&received[30..34]).expect("ASCII");
        let held = held_or_copied(&received, text);
        assert_eq!(
            (held.as_ref(), held.as_ptr()),
            (text.as_bytes(), text.as_ptr())
        );
        let elsewhere = String::from("AAAA");
        let copied = held_or_copied(&received, &elsewhere);
        assert_eq!(copied.as_ref(), b"AAAA");
        assert_ne!(copied.as_ptr(), elsewhere.as_ptr());
    }

    fn images() -> Images {
        let mut settings = ImagesSettings::default();
        settings.fetch.max_bytes = 10_000;
        Images::new(&settings).expect("images")
    }

    use super::test_png as png;

    fn web() -> Target {
        Target {
            formats: FormatSet::of(&[Format::Jpeg, Format::Png, Format::Webp]),
            max_bytes: None,
            max_side: None,
        }
    }

    #[tokio::test]
    async fn data_uris_are_validated_and_kept_when_they_fit() {
        let images = images();
        let encoded = base64::engine::general_purpose::STANDARD.encode(png(4, 3));
        let good = format!("data:image/png;base64,{encoded}");
        assert_eq!(
            images
                .process_data_uri(&good, &Bytes::new(), web())
                .await
                .expect("ok"),
            None
        );

        // Right bytes, wrong declared type: re-labelled, bytes unchanged.
        let mislabelled = format!("data:image/jpeg;base64,{encoded}");
        assert_eq!(
            images
                .process_data_uri(&mislabelled, &Bytes::new(), web())
                .await
                .expect("ok"),
            Some(good.clone())
        );

        let unpadded = good.trim_end_matches('=').to_owned();
        assert!(
            images
                .process_data_uri(&unpadded, &Bytes::new(), web())
                .await
                .is_ok()
        );

        let code = |uri: String| {
            let images = &images;
            async move {
                images
                    .process_data_uri(&uri, &Bytes::new(), web())
                    .await
                    .expect_err("refused")
                    .kind
            }
        };
        assert_eq!(
            code("data:image/png;base64,not*base64!".into()).await,
            ErrorKind::InvalidData
        );
        assert_eq!(
            code(format!(
                "data:image/png;base64,{}",
                base64::engine::general_purpose::STANDARD.encode(b"<html>hello</html>")
            ))
            .await,
            ErrorKind::FormatUnsupported
        );
        assert_eq!(
            code(format!("data:image/png;base64,{}", "A".repeat(20_000))).await,
            ErrorKind::TooLarge
        );
    }

    fn data_uri_of(image: image::DynamicImage, format: image::ImageFormat) -> String {
        let mut out = std::io::Cursor::new(Vec::new());
        image.write_to(&mut out, format).expect("encode");
        let bytes = out.into_inner();
        let mime = Format::ALL
            .into_iter()
            .find(|f| f.image_format() == format)
            .expect("known")
            .mime();
        format!(
            "data:{mime};base64,{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        )
    }

    fn noise(w: u32, h: u32) -> image::DynamicImage {
        image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(w, h, |x, y| {
            let n =
                (x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503)).wrapping_mul(0x9E37_79B1);
            image::Rgb([(n >> 8) as u8, (n >> 16) as u8, (n >> 24) as u8])
        }))
    }

    /// A JPEG's check reads headers and walks its scans: it holds no
    /// pixels, so it runs while the budget is spent.
    #[tokio::test]
    async fn a_jpeg_check_does_not_wait_for_the_decode_budget() {
        let images = Images::new(&ImagesSettings::default()).expect("images");
        let jpeg = data_uri_of(noise(600, 600), image::ImageFormat::Jpeg);
        assert!(
            jpeg.len() > INLINE_CODEC_BYTES * 4 / 3,
            "checked on the pool"
        );
        let spent = images.budget.reserve(u64::MAX).await.expect("all of it");
        let checked = tokio::time::timeout(
            Duration::from_secs(30),
            images.process_data_uri(&jpeg, &Bytes::new(), web()),
        )
        .await
        .expect("no wait for the budget");
        assert_eq!(checked.expect("valid"), None);
        drop(spent);
    }

    /// A PNG's check decodes it whole: it waits for its need, and a request
    /// that ends while it waits gives its place back.
    #[tokio::test]
    async fn a_png_check_waits_for_the_budget_and_gives_up_its_place_with_the_request() {
        let images = Arc::new(Images::new(&ImagesSettings::default()).expect("images"));
        let png = data_uri_of(noise(64, 64), image::ImageFormat::Png);
        let spent = images.budget.reserve(u64::MAX).await.expect("all of it");
        let request = tokio::spawn({
            let images = Arc::clone(&images);
            async move {
                images
                    .process_data_uri(&png, &Bytes::new(), web())
                    .await
                    .map(drop)
            }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!request.is_finished(), "the check waits for its bytes");
        request.abort();
        assert!(request.await.expect_err("ended").is_cancelled());
        drop(spent);
        let total = u32::try_from(DEFAULT_MAX_DECODE_BYTES / 1024).expect("KiB");
        assert_eq!(images.budget.permits_available(), total);
    }

    /// A reload that keeps the budget's size keeps the budget (and the
    /// cores): jobs of the old service and the new count together.
    #[test]
    fn a_reload_keeps_the_budget_when_its_size_is_unchanged() {
        let settings = ImagesSettings::default();
        let old = Images::new(&settings).expect("images");
        let same = Images::succeeding(
            &old,
            &ImagesSettings {
                max_pixels: 1_000,
                ..settings.clone()
            },
        )
        .expect("images");
        assert!(Arc::ptr_eq(&old.budget, &same.budget));
        assert!(Arc::ptr_eq(&old.cpu, &same.cpu));
        let resized = Images::succeeding(
            &old,
            &ImagesSettings {
                max_decode_bytes: 1 << 30,
                ..settings
            },
        )
        .expect("images");
        assert!(!Arc::ptr_eq(&old.budget, &resized.budget));
        assert_eq!(resized.budget.bytes(), 1 << 30);
    }

    #[tokio::test]
    async fn the_pixel_cap_is_checked_from_the_header() {
        let images = Images::new(&ImagesSettings {
            max_pixels: 1_000,
            ..ImagesSettings::default()
        })
        .expect("images");
        // A GIF header claiming 65535x65535, with no pixel data at all.
        let bomb = base64::engine::general_purpose::STANDARD
            .encode(b"GIF89a\xff\xff\xff\xff\x00\x00\x00;");
        let e = images
            .process_data_uri(
                &format!("data:image/gif;base64,{bomb}"),
                &Bytes::new(),
                web(),
            )
            .await
            .expect_err("refused");
        assert_eq!(e.kind, ErrorKind::TooLarge);
        assert!(e.message.contains("65535x65535"), "{}", e.message);
    }
}
