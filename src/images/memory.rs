//! Memory for pixels: what decoding, converting and downscaling one image
//! holds at its peak, computed from its header before any pixel is decoded,
//! and the process-wide budget of those bytes (`images.max_decode_bytes`)
//! that every such job reserves its need from before it runs.
//!
//! The figures are measured, not guessed: the peak heap of each job, per
//! pixel of the source, under a counting allocator (moved reallocations
//! counted twice, as both blocks live during the copy), over PNG (8 and 16
//! bits, palette, grey, alpha, interlaced), progressive and baseline and
//! CMYK JPEG, GIF (frames smaller than the screen), lossy, lossless and
//! animated WebP, BMP, and TIFF (8 and 16 bits, float, LZW, tiled), from
//! smooth gradients to incompressible noise, at 64x64, 3000x2000 and
//! 16000x100. Each term below names what it covers; the model is above
//! every measurement, by 0 to 30 % on the worst cases and more on easy ones
//! (a photo that compresses well is held to what noise would take).

use std::io::Cursor;
use std::sync::Arc;

use image::ImageDecoder;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::convert::{DecodeAllowance, Target, WHOLE_RESIZE_BYTES};
use super::sniff::{self, Format};

/// Fixed costs of one job beside its per-pixel ones: the resize's strip
/// buffers (4 MiB), codec state (deflate windows, Huffman tables) and the
/// allocator's rounding. Measured: under 150 KiB on small images, plus the
/// strips.
const FIXED: u64 = 8 << 20;

/// Rows that decoders and encoders keep beside the image (the PNG
/// decoder's current and previous rows, filter candidates, a JPEG's MCU
/// rows), each at most 16 bytes a pixel. Only visible on very wide images.
const ROWS: u64 = 8 * 16;

/// An image's pixels as the image crate's decoders produce them, read from
/// its header: the input of every need below.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub format: Format,
    pub width: u32,
    pub height: u32,
    /// Bytes a pixel of the decoded image: channels (alpha included) times
    /// bytes a channel (2 for 16-bit, 4 for float).
    pub decoded: u8,
    /// Bytes a pixel of the same image at 8 bits a channel, what Iris
    /// converts it to before anything else: 1 (grey) to 4 (RGBA).
    pub eight_bit: u8,
    /// Bytes a pixel of the decoder's own buffers beside its output.
    pub scratch: u8,
    /// Bytes of the decoder's buffers that follow the file's size rather
    /// than its pixels: a PNG's ancillary chunks (buffered, growing by
    /// doubling), a TIFF's compressed strips.
    pub buffered: u64,
}

impl Layout {
    /// The layout of `bytes`, sniffed as `format` with `dims`. Safe on any
    /// input: where the header cannot be read, the widest layout its format
    /// allows.
    pub fn of(bytes: &[u8], format: Format, (width, height): (u32, u32)) -> Self {
        let layout = |decoded, eight_bit, scratch, buffered| Self {
            format,
            width,
            height,
            decoded,
            eight_bit,
            scratch,
            buffered,
        };
        let input = bytes.len() as u64;
        match format {
            Format::Png => {
                let (decoded, eight_bit) = sniff::png_header(bytes).map_or((8, 4), png_pixel);
                layout(decoded, eight_bit, 0, 2 * input)
            }
            // Grey, or RGB (which CMYK and YCCK become); a progressive
            // frame keeps every coefficient (2 bytes) of every component.
            Format::Jpeg => {
                let frame = sniff::jpeg_frame_header(bytes);
                let components = frame.map_or(4, |f| f.components.clamp(1, 4));
                let pixel = if components == 1 { 1 } else { 3 };
                let progressive = frame.is_none_or(|f| f.progressive);
                let scratch = if progressive { 2 * components } else { 0 };
                layout(pixel, pixel, scratch, 0)
            }
            // Always RGBA; the first frame read into a buffer of its own
            // (as large as the screen at most), and its colour indices.
            Format::Gif => layout(4, 4, 5, 0),
            // RGB for simple lossy files, else RGBA; the lossless decoder
            // works in 4-byte ARGB, an animation's frame is composed onto
            // a canvas of its own (measured: 7 to 8 bytes a pixel).
            Format::Webp => {
                let pixel = if sniff::webp_is_simple_lossy(bytes) {
                    3
                } else {
                    4
                };
                layout(pixel, pixel, 8, 0)
            }
            // 24-bit rows decode to RGB; 32-bit, bitfields and palettes
            // may carry alpha.
            Format::Bmp => {
                let pixel = if sniff::bmp_bit_count(bytes) == Some(24) {
                    3
                } else {
                    4
                };
                layout(pixel, pixel, 0, 0)
            }
            // The decoder says; it reads the whole image in its own sample
            // layout, then copies it out.
            Format::Tiff => {
                let decoder = image::codecs::tiff::TiffDecoder::new(Cursor::new(bytes)).ok();
                let Some(decoder) = decoder else {
                    return layout(16, 4, 16, input);
                };
                let colour = decoder.color_type();
                let source_bits = decoder.original_color_type().bits_per_pixel();
                let scratch = u8::try_from(source_bits.div_ceil(8)).unwrap_or(u8::MAX);
                layout(
                    colour.bytes_per_pixel(),
                    colour.channel_count(),
                    scratch,
                    input,
                )
            }
        }
    }

    fn pixels(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height)
    }

    fn fixed(&self) -> u64 {
        FIXED + ROWS * u64::from(self.width)
    }

    /// A conversion's fixed costs: the decoder's, and a resize done whole
    /// (its float intermediate, at most [`WHOLE_RESIZE_BYTES`]).
    fn transform_fixed(&self) -> u64 {
        self.fixed() + WHOLE_RESIZE_BYTES
    }

    /// Bytes of the decoded image.
    pub fn image_bytes(&self) -> u64 {
        self.pixels() * u64::from(self.decoded)
    }

    /// What decoding holds at its peak: the image, the decoder's buffers,
    /// the fixed costs. All of a validation's need.
    pub fn decode_need(&self) -> u64 {
        self.image_bytes() + self.allowance().decoder
    }

    /// What the decoder may allocate: its output, and beside it (its
    /// `Limits::max_alloc`, which the image crate counts without the
    /// output) its own buffers, exactly what the job reserved for them.
    pub fn allowance(&self) -> DecodeAllowance {
        DecodeAllowance {
            image: self.image_bytes(),
            decoder: self.pixels() * u64::from(self.scratch) + self.buffered + self.fixed(),
        }
    }

    /// What converting, downscaling and encoding for `target` holds at its
    /// peak: the most of its phases, one after the other.
    pub fn transform_need(&self, target: &Target) -> u64 {
        let pixels = self.pixels();
        let image = pixels * u64::from(self.eight_bit);
        // Only JPEG can come out: the source is one and the upstream takes
        // JPEG (kept, and kept when fitting), or the upstream takes nothing
        // else.
        let lossless = [
            Format::Png,
            Format::Webp,
            Format::Gif,
            Format::Bmp,
            Format::Tiff,
        ]
        .into_iter()
        .any(|f| target.formats.contains(f));
        let jpeg_only =
            target.formats.contains(Format::Jpeg) && (self.format == Format::Jpeg || !lossless);
        let (encode, fit) = if jpeg_only {
            // An RGB copy for an image with alpha (grey and alpha, 2, or
            // RGBA, 4: flattened, or the channel dropped), and the JPEG as
            // it grows: 1.75 bytes a pixel measured on noise at quality 85.
            let alpha = self.eight_bit.is_multiple_of(2);
            let rgb_copy = if alpha { 3 } else { 0 };
            let encode = pixels * (rgb_copy + 2);
            // The previous attempt's JPEG, the strips' intermediate (0.9
            // of the image) and the downscaled image (0.81 of it).
            let fit = pixels * 2 + image * 7 / 4;
            (encode, fit)
        } else {
            // PNG of incompressible pixels: the encoder's whole deflate
            // stream, grown by doubling, then copied out (measured: 4.0 to
            // 4.35 times the image, fitting included).
            (image * 9 / 2, 0)
        };
        let phases = [
            self.decode_need(),
            // Brought to 8 bits: both buffers at once (none when it was).
            if self.decoded > self.eight_bit {
                self.image_bytes() + image + self.fixed()
            } else {
                0
            },
            // Turned upright: a rotation copies.
            2 * image + self.fixed(),
            image + encode + self.transform_fixed(),
            if target.max_bytes.is_some() {
                image + fit + self.transform_fixed()
            } else {
                0
            },
        ];
        phases.into_iter().max().unwrap_or(0)
    }
}

/// Decoded and 8-bit bytes a pixel of a PNG, as the image crate decodes it
/// (palettes and low bit depths expanded to 8 bits, tRNS to an alpha
/// channel, 16 bits kept).
fn png_pixel(header: sniff::PngHeader) -> (u8, u8) {
    let channels = match header.colour_type {
        0 => 1,
        2 | 3 => 3,
        4 => 2,
        _ => 4,
    };
    let channels = match (header.colour_type, header.transparency) {
        (0 | 2 | 3, true) => channels + 1,
        _ => channels,
    };
    let wide = header.bit_depth == 16 && header.colour_type != 3;
    (if wide { 2 * channels } else { channels }, channels)
}

/// The bytes of pixels in flight across the process: every decode,
/// conversion and downscale reserves its need here before it runs, and
/// holds it until it has finished.
///
/// Counted in KiB, so that the budget fits tokio's semaphore (whose
/// `acquire_many` takes a `u32`) up to 4 TiB. The semaphore is fair: a
/// large need at the head of the queue is served before smaller ones that
/// came after it, however many of those could fit, so a large image waits
/// only for the work ahead of it, never for a stream of small images.
pub struct DecodeBudget {
    permits: Arc<Semaphore>,
    kib: u32,
}

impl DecodeBudget {
    pub fn new(bytes: u64) -> Self {
        // tokio's own ceiling (`usize::MAX >> 3` permits) is far above
        // u32::MAX KiB (4 TiB) on 64-bit targets, and below it on 32-bit.
        let most = u32::try_from(Semaphore::MAX_PERMITS).unwrap_or(u32::MAX);
        let kib = u32::try_from(bytes.div_ceil(1024))
            .unwrap_or(u32::MAX)
            .clamp(1, most);
        Self {
            permits: Arc::new(Semaphore::new(kib as usize)),
            kib,
        }
    }

    /// KiB free now, for tests.
    #[cfg(test)]
    pub(super) fn permits_available(&self) -> u32 {
        u32::try_from(self.permits.available_permits()).unwrap_or(u32::MAX)
    }

    /// The whole budget, in bytes.
    pub fn bytes(&self) -> u64 {
        u64::from(self.kib) * 1024
    }

    /// Waits until `need` bytes are free, and holds them until the returned
    /// reservation is dropped. A need above the whole budget takes the whole
    /// budget: that image runs alone rather than never. Dropping the future
    /// while it waits (its request ended) leaves the queue.
    pub async fn reserve(&self, need: u64) -> Option<Reservation> {
        let kib = u32::try_from(need.div_ceil(1024))
            .unwrap_or(u32::MAX)
            .clamp(1, self.kib);
        let bytes = u64::from(kib) * 1024;
        let permit = match Arc::clone(&self.permits).try_acquire_many_owned(kib) {
            Ok(permit) => permit,
            Err(_) => {
                let _waiting = Waiting::start();
                Arc::clone(&self.permits)
                    .acquire_many_owned(kib)
                    .await
                    .ok()?
            }
        };
        crate::metrics::IMAGE_DECODE_RESERVED
            .gauge(&[])
            .increment(bytes as f64);
        Some(Reservation {
            _permit: permit,
            bytes,
        })
    }
}

/// Bytes of a [`DecodeBudget`] held by one job until dropped.
#[must_use = "the bytes are released when the reservation is dropped"]
pub struct Reservation {
    _permit: OwnedSemaphorePermit,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        crate::metrics::IMAGE_DECODE_RESERVED
            .gauge(&[])
            .decrement(self.bytes as f64);
    }
}

/// One job waiting for room in the budget, counted while it waits (and
/// uncounted however the wait ends, the request's end included).
struct Waiting;

impl Waiting {
    fn start() -> Self {
        crate::metrics::IMAGE_DECODE_WAITING
            .gauge(&[])
            .increment(1.0);
        crate::metrics::IMAGE_DECODE_WAITS.counter(&[]).increment(1);
        Self
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        crate::metrics::IMAGE_DECODE_WAITING
            .gauge(&[])
            .decrement(1.0);
    }
}

pub(super) fn describe_metrics() {
    metrics::describe_gauge!(
        "iris_image_decode_reserved_bytes",
        metrics::Unit::Bytes,
        "Bytes of images.max_decode_bytes reserved by image decodes, conversions and downscales running now."
    );
    metrics::describe_gauge!(
        "iris_image_decode_waiting",
        "Image jobs waiting for room in images.max_decode_bytes."
    );
    metrics::describe_counter!(
        "iris_image_decode_waits_total",
        "Image jobs that had to wait for room in images.max_decode_bytes."
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::sniff::FormatSet;
    use image::{DynamicImage, ImageBuffer, ImageFormat, Luma, Rgb, Rgba};

    fn encoded(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        image.write_to(&mut out, format).expect("encode");
        out.into_inner()
    }

    fn layout_of(image: &DynamicImage, format: ImageFormat) -> Layout {
        let bytes = encoded(image, format);
        let format = sniff::format(&bytes).expect("format");
        Layout::of(&bytes, format, sniff::dimensions(&bytes).expect("dims"))
    }

    /// (decoded, 8-bit, scratch) bytes a pixel.
    fn bytes(layout: Layout) -> (u8, u8, u8) {
        (layout.decoded, layout.eight_bit, layout.scratch)
    }

    fn target(formats: &[Format], max_bytes: Option<usize>) -> Target {
        Target {
            formats: FormatSet::of(formats),
            max_bytes,
            max_side: None,
        }
    }

    const WEB: &[Format] = &[Format::Jpeg, Format::Png, Format::Webp];

    #[test]
    fn layouts_come_from_the_header_as_the_decoders_decode() {
        let rgb8 = DynamicImage::ImageRgb8(ImageBuffer::from_pixel(40, 30, Rgb([1, 2, 3])));
        let rgba8 = DynamicImage::ImageRgba8(ImageBuffer::from_pixel(40, 30, Rgba([1, 2, 3, 4])));
        let rgb16 = DynamicImage::ImageRgb16(ImageBuffer::from_pixel(40, 30, Rgb([1, 2, 3])));
        let rgba16 = DynamicImage::ImageRgba16(ImageBuffer::from_pixel(40, 30, Rgba([1; 4])));
        let grey16 = DynamicImage::ImageLuma16(ImageBuffer::from_pixel(40, 30, Luma([9])));
        let float = DynamicImage::ImageRgba32F(ImageBuffer::from_pixel(40, 30, Rgba([0.5; 4])));
        for (image, format, expected) in [
            (&rgb16, ImageFormat::Png, (6, 3, 0)),
            (&rgba16, ImageFormat::Png, (8, 4, 0)),
            (&grey16, ImageFormat::Png, (2, 1, 0)),
            (&rgb8, ImageFormat::Png, (3, 3, 0)),
            (&rgba8, ImageFormat::Png, (4, 4, 0)),
            (&rgb8, ImageFormat::Jpeg, (3, 3, 0)),
            (&grey16, ImageFormat::Jpeg, (1, 1, 0)),
            (&rgb8, ImageFormat::Gif, (4, 4, 5)),
            (&rgba8, ImageFormat::WebP, (4, 4, 8)),
            (&rgb8, ImageFormat::Bmp, (3, 3, 0)),
            (&rgba8, ImageFormat::Bmp, (4, 4, 0)),
            (&rgb8, ImageFormat::Tiff, (3, 3, 3)),
            (&rgb16, ImageFormat::Tiff, (6, 3, 6)),
            (&float, ImageFormat::Tiff, (16, 4, 16)),
        ] {
            let layout = layout_of(image, format);
            assert_eq!(bytes(layout), expected, "{:?} {format:?}", image.color());
            // What the decoder itself will say it produces.
            let decoder =
                image::ImageReader::with_format(Cursor::new(encoded(image, format)), format)
                    .into_decoder()
                    .expect("decoder");
            assert_eq!(
                u64::from(decoder.color_type().bytes_per_pixel()),
                u64::from(layout.decoded),
                "{:?} {format:?}",
                image.color()
            );
        }
    }

    #[test]
    fn header_details_that_change_the_layout() {
        // A PNG palette with a tRNS chunk decodes to RGBA.
        let mut png =
            b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR\0\0\0\x10\0\0\0\x10\x08\x03\0\0\0....".to_vec();
        let plte = b"\0\0\0\x03PLTE\0\0\0....";
        png.extend_from_slice(plte);
        let mut with_trns = png.clone();
        with_trns.extend_from_slice(b"\0\0\0\x01tRNS\0....");
        png.extend_from_slice(b"\0\0\0\0IDAT....");
        with_trns.extend_from_slice(b"\0\0\0\0IDAT....");
        let layout = |bytes: &[u8], format| bytes_of_layout(Layout::of(bytes, format, (16, 16)));
        assert_eq!(layout(&png, Format::Png), (3, 3, 0));
        assert_eq!(layout(&with_trns, Format::Png), (4, 4, 0));
        // Chunks that cannot be walked to the data: alpha assumed.
        assert_eq!(layout(&png[..40], Format::Png), (4, 4, 0));

        // A progressive JPEG keeps every coefficient: 2 bytes a component.
        let baseline = encoded(
            &DynamicImage::ImageRgb8(ImageBuffer::new(16, 16)),
            ImageFormat::Jpeg,
        );
        assert_eq!(layout(&baseline, Format::Jpeg), (3, 3, 0));
        let sof = baseline
            .windows(2)
            .position(|w| w == [0xFF, 0xC0])
            .expect("a SOF0");
        let mut progressive = baseline.clone();
        progressive[sof + 1] = 0xC2;
        assert_eq!(layout(&progressive, Format::Jpeg), (3, 3, 6));

        // Unreadable headers: the widest layout of the format.
        assert_eq!(layout(b"\x89PNG\r\n\x1a\n", Format::Png), (8, 4, 0));
        assert_eq!(layout(b"\xFF\xD8\xFF", Format::Jpeg), (3, 3, 8));
        assert_eq!(layout(b"II*\0garbage", Format::Tiff), (16, 4, 16));
    }

    fn bytes_of_layout(layout: Layout) -> (u8, u8, u8) {
        bytes(layout)
    }

    fn layout(format: Format, (width, height): (u32, u32), decoded: u8, eight_bit: u8) -> Layout {
        Layout {
            format,
            width,
            height,
            decoded,
            eight_bit,
            scratch: 0,
            buffered: 0,
        }
    }

    /// The security review's image: 7000x7000, 16-bit RGB, sent to an
    /// upstream that takes only JPEG. Decoded (6 bytes a pixel) and brought
    /// to 8 bits (3 more) at once: 9 bytes a pixel, 441 MB.
    #[test]
    fn the_need_of_a_16_bit_png_converted_to_jpeg() {
        let png = layout(Format::Png, (7000, 7000), 6, 3);
        let pixels = 49_000_000;
        let fixed = FIXED + ROWS * 7000;
        assert_eq!(png.decode_need(), 6 * pixels + fixed);
        assert_eq!(png.allowance().image, 6 * pixels);
        assert_eq!(png.allowance().decoder, fixed);
        assert_eq!(
            png.transform_need(&target(&[Format::Jpeg], None)),
            9 * pixels + fixed
        );
        // Where PNG may come out, the encoder's deflate stream counts
        // (4.5 times the 8-bit image): 16.5 bytes a pixel, and a resize's
        // float intermediate among the fixed costs.
        assert_eq!(
            png.transform_need(&target(WEB, None)),
            3 * pixels * 11 / 2 + fixed + WHOLE_RESIZE_BYTES
        );
    }

    /// The need is above every peak measured (bytes a pixel of the source,
    /// at 3000x2000, from the measurement in the module's doc), for the
    /// worst target of each: these are the figures the model was made from.
    #[test]
    fn the_need_covers_the_measured_peaks() {
        let any = target(&[Format::Png], Some(1));
        let jpeg = target(&[Format::Jpeg], Some(1));
        let photo = target(WEB, Some(1));
        for (what, layout, target, measured) in [
            (
                "png rgb16 to jpeg",
                layout(Format::Png, (3000, 2000), 6, 3),
                &jpeg,
                9.00,
            ),
            (
                "png rgba16 to png",
                layout(Format::Png, (3000, 2000), 8, 4),
                &any,
                14.49,
            ),
            (
                "png rgb noise to png",
                layout(Format::Png, (3000, 2000), 3, 3),
                &any,
                16.05,
            ),
            (
                "png rgba noise to png",
                layout(Format::Png, (3000, 2000), 4, 4),
                &any,
                21.97,
            ),
            (
                "png rgba noise to jpeg",
                layout(Format::Png, (3000, 2000), 4, 4),
                &jpeg,
                8.75,
            ),
            (
                "jpeg photo fitted",
                layout(Format::Jpeg, (3000, 2000), 3, 3),
                &photo,
                9.05,
            ),
            (
                "jpeg photo to png",
                layout(Format::Jpeg, (3000, 2000), 3, 3),
                &any,
                11.23,
            ),
            (
                "bmp rgba to jpeg",
                layout(Format::Bmp, (3000, 2000), 4, 4),
                &jpeg,
                11.07,
            ),
            (
                "progressive jpeg fitted",
                Layout {
                    scratch: 6,
                    ..layout(Format::Jpeg, (3000, 2000), 3, 3)
                },
                &photo,
                9.24,
            ),
            (
                "animated lossless webp to png",
                Layout {
                    scratch: 8,
                    ..layout(Format::Webp, (3000, 2000), 4, 4)
                },
                &any,
                15.38,
            ),
            (
                "gif, a small first frame, to png",
                Layout {
                    scratch: 5,
                    ..layout(Format::Gif, (3000, 2000), 4, 4)
                },
                &any,
                12.50,
            ),
            (
                "float tiff to png",
                Layout {
                    scratch: 16,
                    ..layout(Format::Tiff, (3000, 2000), 16, 4)
                },
                &any,
                32.00,
            ),
        ] {
            let need = layout.transform_need(target) as f64 / 6_000_000.0;
            assert!(need >= measured, "{what}: {need:.2} < {measured}");
            assert!(
                need <= measured * 2.5,
                "{what}: {need:.2} far above {measured}"
            );
        }
    }

    #[tokio::test]
    async fn a_need_above_the_budget_takes_it_whole_and_runs_alone() {
        let budget = DecodeBudget::new(10 << 20);
        let alone = budget.reserve(1 << 40).await.expect("the whole budget");
        assert_eq!(budget.permits.available_permits(), 0);
        let small = tokio::spawn({
            let permits = Arc::clone(&budget.permits);
            async move { permits.acquire_many_owned(1).await.map(drop) }
        });
        tokio::task::yield_now().await;
        assert!(!small.is_finished(), "nothing runs beside it");
        drop(alone);
        small.await.expect("join").expect("then the next");
    }

    #[tokio::test]
    async fn a_large_need_is_served_before_smaller_ones_that_came_later() {
        let budget = Arc::new(DecodeBudget::new(10 << 20));
        let held = budget.reserve(8 << 20).await.expect("8 MiB");
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let job = |name: &'static str, need: u64| {
            let (budget, order) = (Arc::clone(&budget), Arc::clone(&order));
            tokio::spawn(async move {
                let reservation = budget.reserve(need).await.expect("reserved");
                order.lock().expect("lock").push(name);
                reservation
            })
        };
        let large = job("large", 6 << 20);
        tokio::task::yield_now().await;
        // 2 MiB are free, but the large need came first.
        let small = job("small", 1 << 20);
        tokio::task::yield_now().await;
        assert!(!large.is_finished() && !small.is_finished());
        drop(held);
        let (large, small) = (large.await.expect("join"), small.await.expect("join"));
        assert_eq!(*order.lock().expect("lock"), ["large", "small"]);
        drop((large, small));
        assert_eq!(budget.permits.available_permits(), 10 * 1024);
    }

    #[tokio::test]
    async fn a_wait_given_up_leaves_nothing_behind() {
        let budget = Arc::new(DecodeBudget::new(10 << 20));
        let held = budget.reserve(8 << 20).await.expect("8 MiB");
        let waiting = tokio::spawn({
            let budget = Arc::clone(&budget);
            async move { budget.reserve(6 << 20).await.map(drop) }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        // Its request ended: the wait is dropped, with what it was given.
        waiting.abort();
        assert!(waiting.await.expect_err("aborted").is_cancelled());
        drop(held);
        assert_eq!(budget.permits.available_permits(), 10 * 1024);
    }
}
