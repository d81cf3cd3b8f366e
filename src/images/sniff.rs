//! What an image is, from its bytes: the format from magic numbers and the
//! pixel dimensions from the header, without decoding any pixel data.
//!
//! Iris never trusts a server's `Content-Type`, a file name or a data URI's
//! declared type: those are what a client or a hostile server controls.

use std::fmt;

/// The image formats Iris recognises, named as in the config's `image_formats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Jpeg,
    Png,
    Webp,
    Gif,
    Bmp,
    Tiff,
}

impl Format {
    pub const ALL: [Format; 6] = [
        Format::Jpeg,
        Format::Png,
        Format::Webp,
        Format::Gif,
        Format::Bmp,
        Format::Tiff,
    ];

    /// The config name (`image_formats = ["jpeg", ...]`).
    pub fn name(self) -> &'static str {
        match self {
            Format::Jpeg => "jpeg",
            Format::Png => "png",
            Format::Webp => "webp",
            Format::Gif => "gif",
            Format::Bmp => "bmp",
            Format::Tiff => "tiff",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == name)
    }

    pub fn mime(self) -> &'static str {
        match self {
            Format::Jpeg => "image/jpeg",
            Format::Png => "image/png",
            Format::Webp => "image/webp",
            Format::Gif => "image/gif",
            Format::Bmp => "image/bmp",
            Format::Tiff => "image/tiff",
        }
    }

    pub fn image_format(self) -> image::ImageFormat {
        match self {
            Format::Jpeg => image::ImageFormat::Jpeg,
            Format::Png => image::ImageFormat::Png,
            Format::Webp => image::ImageFormat::WebP,
            Format::Gif => image::ImageFormat::Gif,
            Format::Bmp => image::ImageFormat::Bmp,
            Format::Tiff => image::ImageFormat::Tiff,
        }
    }

    /// A bit for [`FormatSet`].
    const fn bit(self) -> u8 {
        1 << self as u8
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of formats (an upstream's `image_formats`), small enough to copy
/// and to use in a cache key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FormatSet(u8);

impl FormatSet {
    pub fn of(formats: &[Format]) -> Self {
        Self(formats.iter().fold(0, |bits, f| bits | f.bit()))
    }

    pub fn contains(self, format: Format) -> bool {
        self.0 & format.bit() != 0
    }
}

/// The format of `bytes`, from their magic number.
pub fn format(bytes: &[u8]) -> Option<Format> {
    match bytes {
        [0xFF, 0xD8, 0xFF, ..] => Some(Format::Jpeg),
        [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A, ..] => Some(Format::Png),
        [b'G', b'I', b'F', b'8', b'7' | b'9', b'a', ..] => Some(Format::Gif),
        [
            b'R',
            b'I',
            b'F',
            b'F',
            _,
            _,
            _,
            _,
            b'W',
            b'E',
            b'B',
            b'P',
            ..,
        ] => Some(Format::Webp),
        [b'B', b'M', ..] if bytes.len() >= 26 => Some(Format::Bmp),
        [b'I', b'I', 0x2A, 0x00, ..] | [b'M', b'M', 0x00, 0x2A, ..] => Some(Format::Tiff),
        _ => None,
    }
}

/// An image's width and height from its header alone: cheap enough to call
/// on every image of every request (the budget estimator does), and safe on
/// any input. `None` when the bytes are not a recognised image.
pub fn dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    let dims = match format(bytes)? {
        Format::Jpeg => jpeg_dimensions(bytes),
        Format::Png => png_dimensions(bytes),
        Format::Gif => gif_dimensions(bytes),
        Format::Webp => webp_dimensions(bytes),
        Format::Bmp => bmp_dimensions(bytes),
        // TIFF keeps its dimensions in tagged directories anywhere in the
        // file; the decoder's header reader finds them without decoding pixels.
        Format::Tiff => {
            image::ImageReader::with_format(std::io::Cursor::new(bytes), image::ImageFormat::Tiff)
                .into_dimensions()
                .ok()
        }
    }?;
    (dims.0 > 0 && dims.1 > 0).then_some(dims)
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le24(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 3)?;
    Some(u32::from(s[0]) | u32::from(s[1]) << 8 | u32::from(s[2]) << 16)
}

/// PNG: the IHDR chunk must come first.
fn png_dimensions(b: &[u8]) -> Option<(u32, u32)> {
    if b.get(12..16)? != b"IHDR" {
        return None;
    }
    Some((be32(b, 16)?, be32(b, 20)?))
}

/// JPEG: from the first start-of-frame.
fn jpeg_dimensions(b: &[u8]) -> Option<(u32, u32)> {
    let (_, at) = jpeg_frame(b)?;
    let height = be16(b, at + 3)?;
    let width = be16(b, at + 5)?;
    Some((u32::from(width), u32::from(height)))
}

/// What a JPEG's frame header says of its pixel data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JpegFrame {
    /// Colour components: 1 (grey), 3 (YCbCr or RGB), 4 (CMYK).
    pub components: u8,
    /// Progressive (SOF2, SOF6, SOF10, SOF14): decoders keep every
    /// coefficient of the image until the last scan.
    pub progressive: bool,
}

pub fn jpeg_frame_header(b: &[u8]) -> Option<JpegFrame> {
    let (marker, at) = jpeg_frame(b)?;
    Some(JpegFrame {
        components: *b.get(at + 7)?,
        progressive: matches!(marker, 0xC2 | 0xC6 | 0xCA | 0xCE),
    })
}

/// The first start-of-frame marker and the offset of its length field.
/// Walks the marker segments, skipping others (EXIF thumbnails included) by
/// their length. Where a segment's length is wrong (editors write broken
/// APP segments) and the next byte is no marker, it scans on to the next
/// marker, as libjpeg does.
fn jpeg_frame(b: &[u8]) -> Option<(u8, usize)> {
    let mut at = 2;
    loop {
        // Stray bytes, then any number of 0xFF fill bytes, then the marker;
        // 0xFF 0x00 is no marker.
        let marker = loop {
            at += b.get(at..)?.iter().position(|&byte| byte == 0xFF)?;
            while *b.get(at)? == 0xFF {
                at += 1;
            }
            let marker = *b.get(at)?;
            at += 1;
            if marker != 0x00 {
                break marker;
            }
        };
        match marker {
            // Standalone markers carry no length.
            0x01 | 0xD0..=0xD7 => continue,
            0xD8..=0xDA => return None,
            _ => {}
        }
        let length = usize::from(be16(b, at)?);
        if length < 2 {
            return None;
        }
        // SOF0..SOF15, except DHT (C4), JPG (C8) and DAC (CC).
        if matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC) {
            return Some((marker, at));
        }
        at += length;
    }
}

/// GIF: the canvas a decoder must allocate, which is the logical screen
/// grown to hold every frame the bytes declare (a frame may lie far outside
/// the screen: a 44-byte file can declare billions of pixels that way).
/// Frames are found by walking the blocks, skipping their data; a body cut
/// short counts the frames seen so far.
fn gif_dimensions(b: &[u8]) -> Option<(u32, u32)> {
    let mut width = u32::from(le16(b, 6)?);
    let mut height = u32::from(le16(b, 8)?);
    let colour_table = |flags: u8| {
        if flags & 0x80 != 0 {
            3 << ((flags & 0x07) + 1)
        } else {
            0
        }
    };
    let Some(&flags) = b.get(10) else {
        return Some((width, height));
    };
    let mut at = 13 + colour_table(flags);
    // Data sub-blocks: a length byte, that many bytes, until a zero length.
    let skip_sub_blocks = |mut at: usize| -> Option<usize> {
        loop {
            let len = usize::from(*b.get(at)?);
            at += 1 + len;
            if len == 0 {
                return Some(at);
            }
        }
    };
    loop {
        match b.get(at) {
            // An image descriptor: left, top, width, height, flags.
            Some(0x2C) => {
                let (Some(left), Some(top), Some(w), Some(h), Some(&flags)) = (
                    le16(b, at + 1),
                    le16(b, at + 3),
                    le16(b, at + 5),
                    le16(b, at + 7),
                    b.get(at + 9),
                ) else {
                    break;
                };
                width = width.max(u32::from(left) + u32::from(w));
                height = height.max(u32::from(top) + u32::from(h));
                // The colour table, the LZW code size, the data.
                match skip_sub_blocks(at + 10 + colour_table(flags) + 1) {
                    Some(next) => at = next,
                    None => break,
                }
            }
            // An extension: its label, then sub-blocks.
            Some(0x21) => match skip_sub_blocks(at + 2) {
                Some(next) => at = next,
                None => break,
            },
            // The trailer, the end of the bytes, or garbage.
            _ => break,
        }
    }
    Some((width, height))
}

/// What a PNG's header chunks say of its pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PngHeader {
    /// IHDR's colour type: 0 grey, 2 RGB, 3 palette, 4 grey and alpha, 6 RGBA.
    pub colour_type: u8,
    /// Bits per sample (per palette index for type 3): 1, 2, 4, 8 or 16.
    pub bit_depth: u8,
    /// A tRNS chunk before the image data: decoders give the image an alpha
    /// channel. `true` too when the chunks could not be walked to the data.
    pub transparency: bool,
}

/// IHDR, then the chunks before the first IDAT (where tRNS must be), walked
/// by their lengths, at most [`PNG_HEADER_CHUNKS`] of them.
pub fn png_header(b: &[u8]) -> Option<PngHeader> {
    if b.get(12..16)? != b"IHDR" {
        return None;
    }
    let (bit_depth, colour_type) = (*b.get(24)?, *b.get(25)?);
    let mut at = 8usize;
    let mut transparency = true;
    for _ in 0..PNG_HEADER_CHUNKS {
        let (Some(len), Some(kind)) = (be32(b, at), b.get(at + 4..at + 8)) else {
            break;
        };
        match kind {
            b"tRNS" => break,
            b"IDAT" => {
                transparency = false;
                break;
            }
            _ => {}
        }
        // Length, type, data, CRC.
        match usize::try_from(len)
            .ok()
            .and_then(|len| at.checked_add(12 + len))
        {
            Some(next) => at = next,
            None => break,
        }
    }
    Some(PngHeader {
        colour_type,
        bit_depth,
        transparency,
    })
}

/// Chunks walked for [`png_header`]: real files have a handful before the
/// image data; a file of thousands of empty chunks is judged without them.
const PNG_HEADER_CHUNKS: usize = 1024;

/// WebP's simple lossy format (a bare VP8 chunk) has no alpha channel;
/// lossless and extended files may have one.
pub fn webp_is_simple_lossy(b: &[u8]) -> bool {
    b.get(12..16) == Some(b"VP8 ")
}

/// A BMP's bits per pixel (BITMAPINFOHEADER or the older core header).
pub fn bmp_bit_count(b: &[u8]) -> Option<u16> {
    match le32(b, 14)? {
        12 => le16(b, 24),
        _ => le16(b, 28),
    }
}

/// WebP: the first chunk says lossy (VP8), lossless (VP8L) or extended (VP8X).
fn webp_dimensions(b: &[u8]) -> Option<(u32, u32)> {
    match b.get(12..16)? {
        b"VP8 " => {
            // A key frame: 3-byte frame tag, then the start code.
            if b.get(23..26)? != [0x9D, 0x01, 0x2A] {
                return None;
            }
            Some((
                u32::from(le16(b, 26)? & 0x3FFF),
                u32::from(le16(b, 28)? & 0x3FFF),
            ))
        }
        b"VP8L" => {
            if *b.get(20)? != 0x2F {
                return None;
            }
            let bits = le32(b, 21)?;
            Some(((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1))
        }
        b"VP8X" => Some((le24(b, 24)? + 1, le24(b, 27)? + 1)),
        _ => None,
    }
}

/// BMP: a BITMAPINFOHEADER (or later) after the 14-byte file header; an older
/// BITMAPCOREHEADER has 16-bit sizes. Height is negative for top-down rows.
fn bmp_dimensions(b: &[u8]) -> Option<(u32, u32)> {
    let header = le32(b, 14)?;
    if header == 12 {
        return Some((u32::from(le16(b, 18)?), u32::from(le16(b, 20)?)));
    }
    let width = le32(b, 18)? as i32;
    let height = le32(b, 22)? as i32;
    Some((width.unsigned_abs(), height.unsigned_abs()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{DynamicImage, ImageFormat, RgbImage, RgbaImage};

    fn encoded(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = std::io::Cursor::new(Vec::new());
        image.write_to(&mut out, format).expect("encode");
        out.into_inner()
    }

    #[test]
    fn formats_and_dimensions_from_real_files() {
        let rgb = DynamicImage::ImageRgb8(RgbImage::from_fn(37, 23, |x, y| {
            image::Rgb([x as u8, y as u8, 7])
        }));
        let rgba = DynamicImage::ImageRgba8(RgbaImage::from_fn(37, 23, |x, y| {
            image::Rgba([x as u8, y as u8, 7, 128])
        }));
        for (image, format, expected) in [
            (&rgb, ImageFormat::Jpeg, Format::Jpeg),
            (&rgb, ImageFormat::Png, Format::Png),
            (&rgba, ImageFormat::WebP, Format::Webp),
            (&rgb, ImageFormat::Gif, Format::Gif),
            (&rgb, ImageFormat::Bmp, Format::Bmp),
            (&rgba, ImageFormat::Bmp, Format::Bmp),
            (&rgb, ImageFormat::Tiff, Format::Tiff),
        ] {
            let bytes = encoded(image, format);
            assert_eq!(super::format(&bytes), Some(expected), "{format:?}");
            assert_eq!(dimensions(&bytes), Some((37, 23)), "{format:?}");
        }
    }

    #[test]
    fn lossy_and_extended_webp_headers() {
        // A lossy VP8 key frame header for 300x200 (the encoder in `image`
        // writes only lossless WebP).
        let mut vp8 = b"RIFF\0\0\0\0WEBPVP8 \0\0\0\0".to_vec();
        vp8.extend_from_slice(&[0x10, 0x02, 0x00, 0x9D, 0x01, 0x2A]);
        vp8.extend_from_slice(&300u16.to_le_bytes());
        vp8.extend_from_slice(&200u16.to_le_bytes());
        assert_eq!(dimensions(&vp8), Some((300, 200)));

        let mut vp8x = b"RIFF\0\0\0\0WEBPVP8X\x0a\0\0\0\x10\0\0\0".to_vec();
        vp8x.extend_from_slice(&[0x3F, 0x1F, 0x00, 0x0F, 0x27, 0x00]);
        assert_eq!(dimensions(&vp8x), Some((8000, 10000)));
    }

    #[test]
    fn jpeg_skips_segments_before_the_frame() {
        let rgb = DynamicImage::ImageRgb8(RgbImage::new(640, 480));
        let plain = encoded(&rgb, ImageFormat::Jpeg);
        // An APP1 segment whose payload contains bytes that look like a SOF marker.
        let mut with_app1 = vec![0xFF, 0xD8, 0xFF, 0xE1, 0x00, 0x0A];
        with_app1.extend_from_slice(&[0xFF, 0xC0, 0x00, 0x11, 0x08, 0x00, 0x01, 0x00]);
        with_app1.extend_from_slice(&plain[2..]);
        assert_eq!(dimensions(&with_app1), Some((640, 480)));
    }

    #[test]
    fn jpeg_resyncs_after_a_segment_with_a_wrong_length() {
        let plain = encoded(
            &DynamicImage::ImageRgb8(RgbImage::new(64, 32)),
            ImageFormat::Jpeg,
        );
        // An APP13 whose length stops short of its data: stray bytes (with a
        // stuffed 0xFF 0x00) before the next real marker.
        let mut broken = vec![0xFF, 0xD8, 0xFF, 0xED, 0x00, 0x04, b'8', b'B'];
        broken.extend_from_slice(b"IM\x04\x04\xFF\x00\x00\x07");
        broken.extend_from_slice(&plain[2..]);
        assert_eq!(dimensions(&broken), Some((64, 32)));
    }

    #[test]
    fn gif_frames_outside_the_logical_screen_grow_the_canvas() {
        // Pillow's decompression_bomb.gif: a 32x32 screen, and one frame of
        // 65535x1321 at row 65280.
        let bomb = b"GIF89a\x20\x00\x20\x00\xf1\x03\x00\x00\x00\x00\xff\x00\x00\xff\xff\x00\xff\xff\xff\x21\xf9\x04\xc9\x00\x00\x00\x00\x2c\x00\x00\x00\xff\xff\xff\x29\x05\x00\x8f";
        assert_eq!(bomb.len(), 44);
        assert_eq!(dimensions(bomb), Some((65535, 65280 + 1321)));
        // Frames inside the screen leave it as it is.
        let gif = encoded(
            &DynamicImage::ImageRgb8(RgbImage::new(40, 30)),
            ImageFormat::Gif,
        );
        assert_eq!(dimensions(&gif), Some((40, 30)));
    }

    #[test]
    fn non_images_and_truncated_headers_are_none() {
        for bytes in [
            &b""[..],
            b"<html>not an image</html>",
            b"\x89PNG\r\n\x1a\n",
            b"\xFF\xD8\xFF",
            b"GIF89a\x01",
            b"RIFF\0\0\0\0WEBPVP8L",
            b"RIFF\0\0\0\0WAVEfmt ",
            b"BM",
            &[0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x00, 0xFF, 0xC0],
        ] {
            assert_eq!(dimensions(bytes), None, "{bytes:?}");
        }
        assert_eq!(format(b"<svg xmlns=...>"), None);
        // Zero-sized images are not images.
        assert_eq!(dimensions(b"GIF89a\0\0\x10\0"), None);
        assert_eq!(dimensions(b"GIF89a\xff\xff\xff\xff"), Some((65535, 65535)));
    }

    #[test]
    fn format_sets() {
        let set = FormatSet::of(&[Format::Jpeg, Format::Png]);
        assert!(set.contains(Format::Jpeg) && set.contains(Format::Png));
        assert!(!set.contains(Format::Gif));
        assert_eq!(
            set,
            FormatSet::of(&[Format::Png, Format::Jpeg, Format::Png])
        );
    }
}
