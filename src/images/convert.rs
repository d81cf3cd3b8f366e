//! Decoding, format conversion, downscaling and fitting an image under a byte
//! size: everything that touches pixels. CPU-bound and blocking, so callers
//! run it on the blocking pool, never on an async worker thread.

use std::collections::HashSet;
use std::io::Cursor;

use image::codecs::jpeg::JpegEncoder;
use image::imageops::FilterType;
use image::metadata::Orientation;
use image::{
    DynamicImage, GenericImageView, ImageBuffer, ImageDecoder, ImageReader, Rgb, RgbImage,
};

use super::sniff::{Format, FormatSet};
use super::{ErrorKind, ImageError};

/// What one upstream (and one image's `detail`) asks of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Target {
    /// Formats the upstream accepts.
    pub formats: FormatSet,
    /// The upstream's `max_image_bytes`.
    pub max_bytes: Option<usize>,
    /// Neither side may exceed this (512 for `detail: "low"` when the field
    /// is stripped).
    pub max_side: Option<u32>,
}

impl Target {
    /// Whether an image of this format, size and dimensions can be sent as
    /// it is: then its bytes go upstream untouched, without decoding.
    pub fn accepts(&self, format: Format, len: usize, (width, height): (u32, u32)) -> bool {
        self.formats.contains(format)
            && self.max_bytes.is_none_or(|max| len <= max)
            && self
                .max_side
                .is_none_or(|max| width <= max && height <= max)
    }
}

/// What decoding one image may allocate, set from what its job reserved in
/// the decode budget ([`super::memory`]): a header that lied to the cheap
/// checks cannot make the decoder take more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeAllowance {
    /// Bytes of the decoded image (the decoder's output).
    pub image: u64,
    /// Bytes of the decoder's own buffers beside its output: the image
    /// crate's `Limits::max_alloc`, which counts those and not the output.
    pub decoder: u64,
}

impl DecodeAllowance {
    /// No limit beyond the pixel cap, for tests and tools.
    pub const UNLIMITED: Self = Self {
        image: u64::MAX,
        decoder: u64::MAX,
    };
}

/// A re-encoded image.
#[derive(Debug)]
pub struct Encoded {
    pub bytes: Vec<u8>,
    pub format: Format,
    pub width: u32,
    pub height: u32,
}

/// JPEG quality for images Iris re-encodes, then the lower one tried before
/// downscaling to fit `max_bytes`.
const QUALITY: u8 = 85;
const FITTING_QUALITY: u8 = 70;
/// Downscaling attempts before `max_bytes` is declared out of reach.
const MAX_FIT_ATTEMPTS: usize = 12;

fn unsupported(message: impl Into<String>) -> ImageError {
    ImageError::new(ErrorKind::FormatUnsupported, "undecodable", message)
}

/// Decodes `bytes` (already sniffed as `format`), converts, downscales and
/// re-encodes it until it meets `target`.
///
/// `max_pixels` and `allowance` are also given to the decoder as limits, so
/// even a header that lied to the cheap checks cannot make it allocate more.
pub fn transform(
    bytes: &[u8],
    format: Format,
    target: &Target,
    max_pixels: u64,
    allowance: DecodeAllowance,
) -> Result<Encoded, ImageError> {
    let mut image = decode(bytes, format, max_pixels, allowance)?;

    if let Some(max) = target.max_side {
        let (w, h) = image.dimensions();
        if w > max || h > max {
            let (nw, nh) = fit_within(w, h, max);
            image = resize(&image, nw, nh);
        }
    }

    let traits = Traits::of(&image);
    let output = choose_format(format, target.formats, traits)
        .ok_or_else(|| unsupported("The upstream accepts no image format Iris can write."))?;
    let mut encoded = encode(&image, output, QUALITY, traits)?;

    let Some(max_bytes) = target.max_bytes else {
        return Ok(finish(encoded, output, &image));
    };
    if encoded.len() <= max_bytes {
        return Ok(finish(encoded, output, &image));
    }

    // Too large: a photo goes to JPEG where accepted (far smaller than
    // lossless formats), at a lower quality; then the image is downscaled,
    // each step aimed at the size still to lose.
    let lossy = traits.photo && target.formats.contains(Format::Jpeg);
    let output = if lossy { Format::Jpeg } else { output };
    let quality = if lossy { FITTING_QUALITY } else { QUALITY };
    if lossy {
        encoded = encode(&image, output, quality, traits)?;
    }
    for _ in 0..MAX_FIT_ATTEMPTS {
        if encoded.len() <= max_bytes {
            return Ok(finish(encoded, output, &image));
        }
        let (w, h) = image.dimensions();
        if w <= 1 && h <= 1 {
            break;
        }
        let ratio = ((max_bytes as f64 / encoded.len() as f64).sqrt() * 0.9).clamp(0.2, 0.9);
        let nw = ((f64::from(w) * ratio) as u32).max(1);
        let nh = ((f64::from(h) * ratio) as u32).max(1);
        image = resize(&image, nw, nh);
        encoded = encode(&image, output, quality, traits)?;
    }
    if encoded.len() <= max_bytes {
        return Ok(finish(encoded, output, &image));
    }
    Err(ImageError::new(
        ErrorKind::TooLarge,
        "max_image_bytes",
        format!("The image could not be made to fit this model's limit of {max_bytes} bytes."),
    ))
}

fn finish(bytes: Vec<u8>, format: Format, image: &DynamicImage) -> Encoded {
    Encoded {
        bytes,
        format,
        width: image.width(),
        height: image.height(),
    }
}

/// Decodes `bytes` (already sniffed as `format` and within the pixel cap by
/// their header) to prove their pixel data whole, for an image forwarded as
/// it is: a damaged data stream is refused here, not by the upstream. GIFs
/// are checked to their first frame, the one models read. Returns the EXIF
/// orientation, which stripping metadata must keep.
///
/// A JPEG is the exception: its decoder (like libjpeg) decodes damaged or
/// cut-short scan data without an error, filling what it cannot read, so a
/// whole decode (about 20 ms a megapixel) proves little more than the
/// headers it reads first. Those are read and checked in full (frame,
/// tables), and the scans' structure is walked to the end-of-image marker.
pub fn validate(
    bytes: &[u8],
    format: Format,
    max_pixels: u64,
    allowance: DecodeAllowance,
) -> Result<Orientation, ImageError> {
    if format == Format::Jpeg {
        return validate_jpeg(bytes, max_pixels);
    }
    let mut decoder = decoder(bytes, format, max_pixels, allowance)?;
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let len = usize::try_from(decoder.total_bytes()).map_err(|_| too_large_to_decode())?;
    let mut pixels = vec![0u8; len];
    decoder
        .read_image(&mut pixels)
        .map_err(|e| undecodable(e, format))?;
    Ok(orientation)
}

/// A JPEG's headers read in full by its decoder (frame, tables, metadata),
/// in place (the `image` crate's reader would copy the file first), and its
/// scans walked to the end-of-image marker.
fn validate_jpeg(bytes: &[u8], max_pixels: u64) -> Result<Orientation, ImageError> {
    let corrupt = |why: &str| {
        ImageError::new(
            ErrorKind::FormatUnsupported,
            "corrupt",
            format!("The jpeg image is damaged: {why}."),
        )
    };
    let options = zune_core::options::DecoderOptions::default()
        .set_strict_mode(false)
        .set_max_width(usize::MAX)
        .set_max_height(usize::MAX);
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(
        zune_core::bytestream::ZCursor::new(bytes),
        options,
    );
    decoder
        .decode_headers()
        .map_err(|_| corrupt("its headers could not be decoded"))?;
    let info = decoder
        .info()
        .ok_or_else(|| corrupt("it has no frame header"))?;
    let (w, h) = (u32::from(info.width), u32::from(info.height));
    if u64::from(w) * u64::from(h) > max_pixels {
        return Err(too_many_pixels(w, h, max_pixels));
    }
    if !jpeg_scans_complete(bytes) {
        return Err(corrupt(
            "its scans do not run to the end-of-image marker (cut short?)",
        ));
    }
    Ok(decoder
        .exif()
        .and_then(|exif| Orientation::from_exif_chunk(exif))
        .unwrap_or(Orientation::NoTransforms))
}

/// Whether a JPEG's structure is whole: segments (past stray bytes, as
/// decoders resynchronise) with a frame header before the first scan, each
/// scan's entropy-coded data running to a real marker (not a stuffed 0xFF
/// 0x00 or a restart marker), and the end-of-image marker reached.
fn jpeg_scans_complete(b: &[u8]) -> bool {
    let be16 = |at: usize| {
        b.get(at..at + 2)
            .map(|s| usize::from(u16::from_be_bytes([s[0], s[1]])))
    };
    let (mut at, mut frame, mut scans) = (2, false, 0);
    loop {
        let Some(offset) = b.get(at..).and_then(|rest| memchr::memchr(0xFF, rest)) else {
            return false;
        };
        let mut m = at + offset;
        while b.get(m) == Some(&0xFF) {
            m += 1;
        }
        let Some(&marker) = b.get(m) else {
            return false;
        };
        at = m + 1;
        match marker {
            0x00 | 0x01 | 0xD0..=0xD7 => continue,
            0xD9 => return frame && scans > 0,
            0xD8 => return false,
            _ => {}
        }
        let Some(len) = be16(at).filter(|&len| len >= 2 && at + len <= b.len()) else {
            return false;
        };
        if matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC) {
            frame = true;
        }
        at += len;
        if marker == 0xDA {
            if !frame {
                return false;
            }
            scans += 1;
            loop {
                let Some(offset) = b.get(at..).and_then(|rest| memchr::memchr(0xFF, rest)) else {
                    return false;
                };
                let ff = at + offset;
                match b.get(ff + 1) {
                    None => return false,
                    Some(0x00 | 0xD0..=0xD7 | 0xFF) => at = ff + 1,
                    Some(_) => {
                        at = ff;
                        break;
                    }
                }
            }
        }
    }
}

/// Decodes with the pixel cap as a decoder limit, brings the image to 8 bits
/// a channel, and turns it upright by its EXIF orientation (which
/// re-encoding would otherwise drop).
///
/// Every format Iris writes is written at 8 bits a channel (upstream models
/// see 8-bit colour), so a 16-bit or float image is converted at once: its
/// buffer, two to four times the size, is freed before the copies that
/// rotating, resizing and encoding make.
fn decode(
    bytes: &[u8],
    format: Format,
    max_pixels: u64,
    allowance: DecodeAllowance,
) -> Result<DynamicImage, ImageError> {
    let mut decoder = decoder(bytes, format, max_pixels, allowance)?;
    let orientation = decoder.orientation().ok();
    let image = DynamicImage::from_decoder(decoder).map_err(|e| undecodable(e, format))?;
    let mut image = eight_bit(image);
    if let Some(orientation) = orientation {
        image.apply_orientation(orientation);
    }
    Ok(image)
}

/// The image at 8 bits a channel, with the channels it has.
fn eight_bit(image: DynamicImage) -> DynamicImage {
    match image {
        DynamicImage::ImageLuma8(_)
        | DynamicImage::ImageLumaA8(_)
        | DynamicImage::ImageRgb8(_)
        | DynamicImage::ImageRgba8(_) => image,
        DynamicImage::ImageLuma16(_) => DynamicImage::ImageLuma8(image.to_luma8()),
        DynamicImage::ImageLumaA16(_) => DynamicImage::ImageLumaA8(image.to_luma_alpha8()),
        _ if image.color().has_alpha() => DynamicImage::ImageRgba8(image.to_rgba8()),
        _ => DynamicImage::ImageRgb8(image.to_rgb8()),
    }
}

/// Resizes (triangle filter) without the image crate's whole intermediate:
/// `imageops::resize` filters columns into a 32-bit float RGBA image of the
/// source's width and the new height (16 bytes a pixel: 700 MB for a 50 MP
/// image shrunk by 10 %) before it filters rows. The same two passes run
/// here on strips, each through the crate's own resize with the other side
/// unchanged (which filters by the identity), into an 8-bit intermediate:
/// columns strip by strip, then rows band by band, each strip's float
/// buffer at most [`STRIP_BYTES`]. The result differs from a whole resize
/// only by rounding the intermediate to 8 bits.
///
/// The strips cost CPU (the identity passes, the copies: about a third
/// more than a whole resize), so an image whose whole float intermediate
/// is at most [`WHOLE_RESIZE_BYTES`] is resized whole.
///
/// Only the image crate's concrete `DynamicImage` methods touch pixels
/// (compiled, optimised, in that crate); the strips are put together here
/// with slice copies.
fn resize(image: &DynamicImage, width: u32, height: u32) -> DynamicImage {
    let (w, h) = image.dimensions();
    if (w, h) == (width, height) {
        return image.clone();
    }
    if u64::from(w) * u64::from(height) * 16 <= WHOLE_RESIZE_BYTES {
        return image.resize_exact(width, height, FilterType::Triangle);
    }
    let Some(columns) = assemble(image, w, height, Side::Columns, |x, part| {
        image
            .crop_imm(x, 0, part, h)
            .resize_exact(part, height, FilterType::Triangle)
    }) else {
        return image.resize_exact(width, height, FilterType::Triangle);
    };
    assemble(&columns, width, height, Side::Rows, |y, part| {
        columns
            .crop_imm(0, y, w, part)
            .resize_exact(width, part, FilterType::Triangle)
    })
    .unwrap_or_else(|| image.resize_exact(width, height, FilterType::Triangle))
}

/// The float buffer of one strip's pass (see [`resize`]).
const STRIP_BYTES: u64 = 4 << 20;

/// The largest float intermediate of a resize done whole (see [`resize`]):
/// part of a conversion's fixed costs ([`super::memory`]).
pub const WHOLE_RESIZE_BYTES: u64 = 16 << 20;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    /// Strips side by side, each `part` columns wide and `height` tall.
    Columns,
    /// Bands one under the other, each `width` wide and `part` rows tall.
    Rows,
}

/// A `width`x`height` image of `like`'s colour type, put together from the
/// pieces `piece(offset, part)` makes, across `side`, each small enough
/// that its resize's float buffer (16 bytes a pixel) is at most
/// [`STRIP_BYTES`]. `None` when `like` is not 8-bit (decode() makes every
/// image 8-bit) or a piece is not the size asked for.
fn assemble(
    like: &DynamicImage,
    width: u32,
    height: u32,
    side: Side,
    mut piece: impl FnMut(u32, u32) -> DynamicImage,
) -> Option<DynamicImage> {
    const FLOAT_PIXEL: u64 = 16;
    let bpp = usize::from(like.color().bytes_per_pixel());
    let (across, along) = match side {
        Side::Columns => (width, height),
        Side::Rows => (height, width),
    };
    let step = u32::try_from(STRIP_BYTES / (u64::from(along.max(1)) * FLOAT_PIXEL))
        .unwrap_or(u32::MAX)
        .max(1);
    let row = width as usize * bpp;
    let mut out = vec![0u8; row * height as usize];
    let mut at = 0;
    while at < across {
        let part = step.min(across - at);
        let done = piece(at, part);
        let bytes = done.as_bytes();
        match side {
            Side::Columns => {
                let (offset, piece_row) = (at as usize * bpp, part as usize * bpp);
                if bytes.len() != piece_row * height as usize {
                    return None;
                }
                for (y, source) in bytes.chunks_exact(piece_row).enumerate() {
                    let start = y * row + offset;
                    out.get_mut(start..start + piece_row)?
                        .copy_from_slice(source);
                }
            }
            Side::Rows => {
                let start = at as usize * row;
                if bytes.len() != part as usize * row {
                    return None;
                }
                out.get_mut(start..start + bytes.len())?
                    .copy_from_slice(bytes);
            }
        }
        at += part;
    }
    match like {
        DynamicImage::ImageLuma8(_) => {
            ImageBuffer::from_raw(width, height, out).map(DynamicImage::ImageLuma8)
        }
        DynamicImage::ImageLumaA8(_) => {
            ImageBuffer::from_raw(width, height, out).map(DynamicImage::ImageLumaA8)
        }
        DynamicImage::ImageRgb8(_) => {
            ImageBuffer::from_raw(width, height, out).map(DynamicImage::ImageRgb8)
        }
        DynamicImage::ImageRgba8(_) => {
            ImageBuffer::from_raw(width, height, out).map(DynamicImage::ImageRgba8)
        }
        _ => None,
    }
}

/// A decoder for `bytes` whose header is within the pixel cap, with the cap
/// and `allowance` as its limits too, so even a header that lied to the
/// cheap checks cannot make it allocate more than its job reserved.
fn decoder(
    bytes: &[u8],
    format: Format,
    max_pixels: u64,
    allowance: DecodeAllowance,
) -> Result<Box<dyn ImageDecoder + '_>, ImageError> {
    let mut limits = image::Limits::default();
    let side = u32::try_from(max_pixels).unwrap_or(u32::MAX);
    limits.max_image_width = Some(side);
    limits.max_image_height = Some(side);
    limits.max_alloc = Some(allowance.decoder);
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format.image_format());
    reader.limits(limits);
    let decoder = reader.into_decoder().map_err(|e| undecodable(e, format))?;
    let (w, h) = decoder.dimensions();
    if u64::from(w) * u64::from(h) > max_pixels {
        return Err(too_many_pixels(w, h, max_pixels));
    }
    if decoder.total_bytes() > allowance.image {
        return Err(too_large_to_decode());
    }
    // A side of 0 decodes to nothing, and nothing can be encoded from it.
    if w == 0 || h == 0 {
        return Err(unsupported("The image has no pixels (a side of 0)."));
    }
    Ok(Box::new(decoder))
}

/// A decoder's failure: over a limit, or pixel data that is not what its
/// format says (corrupt, truncated).
fn undecodable(e: image::ImageError, format: Format) -> ImageError {
    match e {
        image::ImageError::Limits(_) => too_large_to_decode(),
        _ => ImageError::new(
            ErrorKind::FormatUnsupported,
            "corrupt",
            format!("The {format} image is damaged: its pixel data could not be decoded."),
        ),
    }
}

fn too_large_to_decode() -> ImageError {
    ImageError::new(
        ErrorKind::TooLarge,
        "pixels",
        "The image is too large to decode.",
    )
}

pub fn too_many_pixels(width: u32, height: u32, max_pixels: u64) -> ImageError {
    ImageError::new(
        ErrorKind::TooLarge,
        "pixels",
        format!(
            "The image is {width}x{height} pixels, more than the {max_pixels} pixels this gateway decodes."
        ),
    )
}

/// The largest `(w, h)` with the same aspect ratio and neither side above `max`.
pub fn fit_within(w: u32, h: u32, max: u32) -> (u32, u32) {
    if w <= max && h <= max {
        return (w, h);
    }
    let scale = f64::from(max) / f64::from(w.max(h));
    let nw = ((f64::from(w) * scale).round() as u32).clamp(1, max);
    let nh = ((f64::from(h) * scale).round() as u32).clamp(1, max);
    (nw, nh)
}

/// What decides the output format.
#[derive(Debug, Clone, Copy)]
struct Traits {
    /// Some pixel is not fully opaque.
    transparent: bool,
    /// Opaque with many colours: JPEG's kind of image. Few colours (a chart,
    /// a screenshot, a GIF) stay lossless, where JPEG would smear the edges.
    photo: bool,
}

impl Traits {
    /// Samples at most ~64k pixels on a grid, so this stays cheap on any image.
    fn of(image: &DynamicImage) -> Self {
        const SAMPLES: u64 = 65_536;
        const MANY_COLOURS: usize = 256;
        let (w, h) = image.dimensions();
        let total = u64::from(w) * u64::from(h);
        let step = ((total as f64 / SAMPLES as f64).sqrt().floor() as u32).max(1);
        let has_alpha = image.color().has_alpha();
        let mut transparent = false;
        let mut colours = HashSet::with_capacity(MANY_COLOURS + 1);
        let mut y = 0;
        while y < h {
            let mut x = 0;
            while x < w {
                let p = image.get_pixel(x, y).0;
                if has_alpha && p[3] < 255 {
                    transparent = true;
                }
                if colours.len() <= MANY_COLOURS {
                    colours.insert([p[0], p[1], p[2]]);
                }
                x += step;
            }
            y += step;
        }
        Self {
            transparent,
            photo: !transparent && colours.len() > MANY_COLOURS,
        }
    }
}

/// The format to write: the source's own when accepted (re-encoding a PNG
/// as a PNG keeps it lossless), else PNG, or JPEG for photos, else whatever
/// the upstream does accept.
fn choose_format(source: Format, accepted: FormatSet, traits: Traits) -> Option<Format> {
    // Iris writes WebP only lossless and GIF only quantised, so neither is
    // a good choice for a re-encoded photo even when it was the source.
    let keep_source = match source {
        Format::Jpeg | Format::Png => true,
        Format::Webp | Format::Gif => !traits.photo,
        Format::Bmp | Format::Tiff => false,
    };
    if keep_source && accepted.contains(source) {
        return Some(source);
    }
    let preference: &[Format] = if traits.photo {
        &[
            Format::Jpeg,
            Format::Webp,
            Format::Png,
            Format::Tiff,
            Format::Bmp,
            Format::Gif,
        ]
    } else if traits.transparent {
        &[
            Format::Png,
            Format::Webp,
            Format::Gif,
            Format::Tiff,
            Format::Bmp,
            Format::Jpeg,
        ]
    } else {
        &[
            Format::Png,
            Format::Webp,
            Format::Gif,
            Format::Jpeg,
            Format::Tiff,
            Format::Bmp,
        ]
    };
    preference.iter().copied().find(|f| accepted.contains(*f))
}

fn encode(
    image: &DynamicImage,
    format: Format,
    quality: u8,
    traits: Traits,
) -> Result<Vec<u8>, ImageError> {
    let mut out = Cursor::new(Vec::new());
    let failed = |_| unsupported(format!("The image could not be encoded as {format}."));
    match format {
        Format::Jpeg => {
            let encoder = JpegEncoder::new_with_quality(&mut out, quality);
            if traits.transparent {
                flatten_on_white(image)
                    .write_with_encoder(encoder)
                    .map_err(failed)?;
            } else if image.color().has_alpha() || image.color().bytes_per_pixel() > 3 {
                DynamicImage::ImageRgb8(image.to_rgb8())
                    .write_with_encoder(encoder)
                    .map_err(failed)?;
            } else {
                image.write_with_encoder(encoder).map_err(failed)?;
            }
        }
        // At 8 bits a channel already (decode() converts).
        _ => image
            .write_to(&mut out, format.image_format())
            .map_err(failed)?,
    }
    Ok(out.into_inner())
}

/// Composites transparent pixels over white: JPEG has no alpha, and black
/// (what dropping the channel gives) hides dark content. Written straight
/// into the RGB image, with no RGBA copy between.
fn flatten_on_white(image: &DynamicImage) -> DynamicImage {
    let (w, h) = image.dimensions();
    DynamicImage::ImageRgb8(RgbImage::from_fn(w, h, |x, y| {
        let pixel = image.get_pixel(x, y).0;
        let alpha = u16::from(pixel[3]);
        Rgb(std::array::from_fn(|c| {
            let value = u16::from(pixel[c]);
            ((value * alpha + 255 * (255 - alpha)) / 255) as u8
        }))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::sniff;
    use image::{ImageFormat, Rgba, RgbaImage};

    fn photo(w: u32, h: u32) -> DynamicImage {
        // Smooth gradients plus per-pixel noise: many colours, like a photo.
        DynamicImage::ImageRgb8(RgbImage::from_fn(w, h, |x, y| {
            let noise = (x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503)) % 23;
            Rgb([
                ((x * 255 / w.max(1)) as u8).wrapping_add(noise as u8),
                ((y * 255 / h.max(1)) as u8).wrapping_add(noise as u8),
                ((x + y) % 256) as u8,
            ])
        }))
    }

    fn chart(w: u32, h: u32) -> DynamicImage {
        DynamicImage::ImageRgb8(RgbImage::from_fn(w, h, |x, _| {
            if x % 20 < 10 {
                Rgb([255, 0, 0])
            } else {
                Rgb([255, 255, 255])
            }
        }))
    }

    fn bytes_of(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        image.write_to(&mut out, format).expect("encode");
        out.into_inner()
    }

    fn target(formats: &[Format]) -> Target {
        Target {
            formats: FormatSet::of(formats),
            max_bytes: None,
            max_side: None,
        }
    }

    const WEB: &[Format] = &[Format::Jpeg, Format::Png, Format::Webp];
    const ANY: DecodeAllowance = DecodeAllowance::UNLIMITED;

    /// Found by the image_decode fuzz target: a GIF whose screen is 3×0
    /// was converted to a PNG of no pixels, which no header describes.
    #[test]
    fn an_image_with_a_side_of_zero_is_refused_not_converted() {
        let gif = include_bytes!("../../tests/fixtures/fuzz/gif-zero-height.gif");
        for formats in [WEB, &[Format::Gif][..]] {
            let refused = transform(gif, Format::Gif, &target(formats), 1 << 24, ANY)
                .expect_err("nothing to convert");
            assert_eq!(refused.kind, ErrorKind::FormatUnsupported);
        }
        let refused = validate(gif, Format::Gif, 1 << 24, ANY).expect_err("nothing to forward");
        assert_eq!(refused.kind, ErrorKind::FormatUnsupported);
    }

    #[test]
    fn unaccepted_formats_become_png_or_jpeg_for_photos() {
        let gif = bytes_of(&chart(120, 80), ImageFormat::Gif);
        let out = transform(&gif, Format::Gif, &target(WEB), 1 << 30, ANY).expect("converted");
        assert_eq!(out.format, Format::Png);
        assert_eq!(sniff::format(&out.bytes), Some(Format::Png));
        assert_eq!(sniff::dimensions(&out.bytes), Some((120, 80)));

        let bmp = bytes_of(&photo(200, 150), ImageFormat::Bmp);
        let out = transform(&bmp, Format::Bmp, &target(WEB), 1 << 30, ANY).expect("converted");
        assert_eq!(out.format, Format::Jpeg);
        assert_eq!(sniff::dimensions(&out.bytes), Some((200, 150)));

        let tiff = bytes_of(&photo(64, 48), ImageFormat::Tiff);
        let out = transform(&tiff, Format::Tiff, &target(&[Format::Png]), 1 << 30, ANY)
            .expect("converted");
        assert_eq!(out.format, Format::Png, "PNG when JPEG is not accepted");
    }

    #[test]
    fn transparency_never_goes_to_jpeg_unless_nothing_else_is_accepted() {
        let rgba = DynamicImage::ImageRgba8(RgbaImage::from_fn(300, 300, |x, y| {
            Rgba([
                (x % 256) as u8,
                (y % 256) as u8,
                ((x * y) % 256) as u8,
                (x % 200) as u8,
            ])
        }));
        let bmp = bytes_of(&rgba, ImageFormat::Bmp);
        let out = transform(&bmp, Format::Bmp, &target(WEB), 1 << 30, ANY).expect("converted");
        assert_eq!(out.format, Format::Png);

        let out = transform(&bmp, Format::Bmp, &target(&[Format::Jpeg]), 1 << 30, ANY)
            .expect("converted");
        assert_eq!(out.format, Format::Jpeg);
        // Fully transparent pixels (x = 0) come out white, not black.
        let decoded = image::load_from_memory(&out.bytes)
            .expect("decode")
            .to_rgb8();
        assert!(decoded.get_pixel(0, 150).0.iter().all(|&c| c > 200));
    }

    #[test]
    fn low_detail_downscales_to_512_keeping_the_aspect_ratio() {
        let png = bytes_of(&chart(2000, 1000), ImageFormat::Png);
        let t = Target {
            max_side: Some(512),
            ..target(WEB)
        };
        let out = transform(&png, Format::Png, &t, 1 << 30, ANY).expect("resized");
        assert_eq!(out.format, Format::Png, "an accepted source format is kept");
        assert_eq!((out.width, out.height), (512, 256));
        assert_eq!(sniff::dimensions(&out.bytes), Some((512, 256)));
    }

    #[test]
    fn fits_under_max_bytes_by_reencoding_then_downscaling() {
        let big = photo(1600, 1200);
        let png = bytes_of(&big, ImageFormat::Png);
        assert!(png.len() > 1_000_000, "{}", png.len());
        let t = Target {
            max_bytes: Some(100_000),
            ..target(WEB)
        };
        let out = transform(&png, Format::Png, &t, 1 << 30, ANY).expect("fitted");
        assert!(out.bytes.len() <= 100_000, "{}", out.bytes.len());
        assert_eq!(out.format, Format::Jpeg, "a photo goes lossy to fit");
        assert_eq!(sniff::dimensions(&out.bytes), Some((out.width, out.height)));
        // Same aspect ratio, within rounding.
        let ratio = f64::from(out.width) / f64::from(out.height);
        assert!((ratio - 4.0 / 3.0).abs() < 0.02, "{ratio}");

        // A lossless-only upstream gets a smaller PNG instead.
        let t = Target {
            max_bytes: Some(200_000),
            ..target(&[Format::Png])
        };
        let out = transform(&png, Format::Png, &t, 1 << 30, ANY).expect("fitted");
        assert_eq!(out.format, Format::Png);
        assert!(out.bytes.len() <= 200_000);
        assert!(out.width < 1600);
    }

    #[test]
    fn impossible_fits_and_garbage_are_refused() {
        let png = bytes_of(&photo(300, 300), ImageFormat::Png);
        let t = Target {
            max_bytes: Some(10),
            ..target(WEB)
        };
        let e = transform(&png, Format::Png, &t, 1 << 30, ANY).expect_err("cannot fit");
        assert_eq!(e.kind, ErrorKind::TooLarge);

        let mut garbage = b"\x89PNG\r\n\x1a\n".to_vec();
        garbage.extend_from_slice(&[0u8; 64]);
        let e = transform(
            &garbage,
            Format::Png,
            &target(&[Format::Jpeg]),
            1 << 30,
            ANY,
        )
        .expect_err("not decodable");
        assert_eq!(e.kind, ErrorKind::FormatUnsupported);
    }

    #[test]
    fn the_decoder_enforces_the_pixel_cap_too() {
        let png = bytes_of(&chart(400, 300), ImageFormat::Png);
        let e = transform(&png, Format::Png, &target(&[Format::Jpeg]), 100_000, ANY)
            .expect_err("over the cap");
        assert_eq!(e.kind, ErrorKind::TooLarge);
    }

    #[test]
    fn validation_refuses_damaged_pixel_data_and_cut_short_jpegs() {
        let jpeg = bytes_of(&photo(64, 48), ImageFormat::Jpeg);
        assert!(validate(&jpeg, Format::Jpeg, 1 << 30, ANY).is_ok());
        // Cut short: no end-of-image marker.
        let e = validate(&jpeg[..jpeg.len() - 40], Format::Jpeg, 1 << 30, ANY).expect_err("cut");
        assert_eq!(
            (e.kind, e.reason),
            (ErrorKind::FormatUnsupported, "corrupt")
        );
        // Trailing bytes after the image are fine (cameras append previews).
        let mut trailing = jpeg.clone();
        trailing.extend_from_slice(b"\xFF\xD8 a preview");
        assert!(validate(&trailing, Format::Jpeg, 1 << 30, ANY).is_ok());

        let png = bytes_of(&chart(64, 48), ImageFormat::Png);
        assert!(validate(&png, Format::Png, 1 << 30, ANY).is_ok());
        let mut damaged = png.clone();
        let at = damaged.len() - 30;
        damaged[at] ^= 0x55;
        let e = validate(&damaged, Format::Png, 1 << 30, ANY).expect_err("damaged");
        assert_eq!(
            (e.kind, e.reason),
            (ErrorKind::FormatUnsupported, "corrupt")
        );
        let e = validate(&png, Format::Png, 1000, ANY).expect_err("over the cap");
        assert_eq!(e.kind, ErrorKind::TooLarge);
    }

    /// Several strips in each pass (a strip's float buffer holds
    /// `STRIP_BYTES`), and the same pixels as the image crate's whole
    /// resize but for rounding the intermediate to 8 bits.
    #[test]
    fn resizing_in_strips_matches_the_whole_resize() {
        let source = photo(600, 2400);
        let (w, h) = (500, 2000);
        // Columns: strips of the new height; rows: bands of the old width.
        assert!(u64::from(h) * 16 * 600 > 4 * STRIP_BYTES);
        assert!(u64::from(h) * 16 * 600 > WHOLE_RESIZE_BYTES, "in strips");
        let strips = resize(&source, w, h).to_rgb8();
        let whole = source.resize_exact(w, h, FilterType::Triangle).to_rgb8();
        assert_eq!(strips.dimensions(), (w, h));
        let worst = strips
            .as_raw()
            .iter()
            .zip(whole.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .max();
        assert!(worst <= Some(1), "{worst:?}");
    }

    /// The decoder's limits are what the job reserved: its output no larger
    /// than the image's share, its own buffers no larger than the rest.
    #[test]
    fn the_decoder_takes_no_more_than_its_allowance() {
        use crate::images::memory::Layout;
        let rgba = DynamicImage::ImageRgba8(RgbaImage::from_pixel(40, 30, Rgba([1, 2, 3, 4])));
        let png = bytes_of(&rgba, ImageFormat::Png);
        let layout = Layout::of(&png, Format::Png, (40, 30));
        let allowance = layout.allowance();
        assert_eq!(allowance.image, 40 * 30 * 4);
        let jpeg = target(&[Format::Jpeg]);
        assert!(validate(&png, Format::Png, 1 << 30, allowance).is_ok());
        assert!(transform(&png, Format::Png, &jpeg, 1 << 30, allowance).is_ok());

        // A header claiming less than the decoder will produce.
        let short = DecodeAllowance {
            image: allowance.image - 1,
            ..allowance
        };
        for refused in [
            validate(&png, Format::Png, 1 << 30, short).expect_err("output"),
            transform(&png, Format::Png, &jpeg, 1 << 30, short).expect_err("output"),
        ] {
            assert_eq!(
                (refused.kind, refused.reason),
                (ErrorKind::TooLarge, "pixels")
            );
        }

        // A GIF's first frame, smaller than its screen, is read into a
        // buffer of its own: the decoder's share.
        let mut gif = bytes_of(&chart(20, 10), ImageFormat::Gif);
        gif[6..10].copy_from_slice(&[40, 0, 30, 0]);
        let layout = Layout::of(&gif, Format::Gif, (40, 30));
        assert!(validate(&gif, Format::Gif, 1 << 30, layout.allowance()).is_ok());
        let starved = DecodeAllowance {
            decoder: 100,
            ..layout.allowance()
        };
        let refused = validate(&gif, Format::Gif, 1 << 30, starved).expect_err("frame");
        assert_eq!(refused.kind, ErrorKind::TooLarge);
    }

    #[test]
    fn fit_within_keeps_aspect() {
        assert_eq!(fit_within(100, 50, 512), (100, 50));
        assert_eq!(fit_within(1024, 1024, 512), (512, 512));
        assert_eq!(fit_within(4000, 10, 512), (512, 1));
        assert_eq!(fit_within(600, 800, 512), (384, 512));
    }
}
