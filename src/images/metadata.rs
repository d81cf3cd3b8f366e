//! Removing metadata (EXIF with its GPS position, XMP, IPTC, comments, text
//! chunks) from an image forwarded as it is, without touching its pixels:
//! the compressed image data is copied byte for byte, only the segments or
//! chunks that carry metadata are left out.
//!
//! Kept: everything a decoder needs to show the same picture, namely the
//! ICC colour profile, JFIF and Adobe segments, PNG colour chunks (`iCCP`,
//! `sRGB`, `gAMA`, `cHRM`, `sBIT`, `pHYs`), and the EXIF orientation, which
//! is written back as a one-entry EXIF block when it is not "upright", so
//! the model sees the photo the right way up.

use image::metadata::Orientation;

use super::sniff::Format;

/// `bytes` (already sniffed as `format` and fully decoded, so well formed)
/// without their metadata; `None` when there is none to remove, or the
/// format keeps none Iris removes (GIF, BMP, TIFF: see docs/images.md).
pub fn strip(bytes: &[u8], format: Format, orientation: Orientation) -> Option<Vec<u8>> {
    let stripped = match format {
        Format::Jpeg => jpeg(bytes, orientation),
        Format::Png => png(bytes, orientation),
        Format::Webp => webp(bytes, orientation),
        Format::Gif | Format::Bmp | Format::Tiff => None,
    }?;
    (stripped != bytes).then_some(stripped)
}

/// A TIFF-structured EXIF block with one entry, the orientation (big-endian).
fn orientation_exif(orientation: Orientation) -> Option<Vec<u8>> {
    if orientation == Orientation::NoTransforms {
        return None;
    }
    let mut tiff = b"MM\x00\x2a\x00\x00\x00\x08".to_vec();
    tiff.extend_from_slice(&1u16.to_be_bytes()); // one entry
    tiff.extend_from_slice(&0x0112u16.to_be_bytes()); // Orientation
    tiff.extend_from_slice(&3u16.to_be_bytes()); // SHORT
    tiff.extend_from_slice(&1u32.to_be_bytes()); // one value
    tiff.extend_from_slice(&u16::from(orientation.to_exif()).to_be_bytes());
    tiff.extend_from_slice(&[0, 0]); // the value's padding to 4 bytes
    tiff.extend_from_slice(&0u32.to_be_bytes()); // no next directory
    Some(tiff)
}

fn be16(b: &[u8], at: usize) -> Option<usize> {
    Some(usize::from(u16::from_be_bytes(
        b.get(at..at + 2)?.try_into().ok()?,
    )))
}

/// JPEG: keeps APP0 (JFIF), APP2 ICC profiles, APP14 (Adobe: the colour
/// transform) and every non-APP segment; drops APP1 (EXIF, XMP), the other
/// APPn (IPTC, maker data, FlashPix), comments, stray bytes between segments
/// and anything after the end-of-image marker (appended previews, videos).
fn jpeg(b: &[u8], orientation: Orientation) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(b.len());
    out.extend_from_slice(b.get(..2)?);
    let mut exif = orientation_exif(orientation);
    let mut at = 2;
    loop {
        // The next marker: 0xFF, any fill 0xFFs, a byte other than 0x00.
        let Some(offset) = b.get(at..)?.iter().position(|&byte| byte == 0xFF) else {
            return Some(out);
        };
        let start = at + offset;
        let mut m = start;
        while b.get(m) == Some(&0xFF) {
            m += 1;
        }
        let Some(&marker) = b.get(m) else {
            return Some(out);
        };
        let after = m + 1;
        match marker {
            0x00 => {
                at = after;
                continue;
            }
            0xD9 => {
                out.extend_from_slice(&[0xFF, 0xD9]);
                return Some(out);
            }
            0x01 | 0xD0..=0xD7 => {
                out.extend_from_slice(&[0xFF, marker]);
                at = after;
                continue;
            }
            _ => {}
        }
        let len = be16(b, after)?;
        let end = after + len;
        if len < 2 || end > b.len() {
            return None;
        }
        let payload = &b[after + 2..end];
        let keep = match marker {
            0xE0 | 0xEE => true,
            0xE2 => payload.starts_with(b"ICC_PROFILE\0"),
            0xE1 | 0xE3..=0xED | 0xEF | 0xFE => false,
            _ => true,
        };
        // The orientation goes where EXIF belongs: after JFIF, before the rest.
        if marker != 0xE0
            && let Some(tiff) = exif.take()
        {
            out.extend_from_slice(&[0xFF, 0xE1]);
            out.extend_from_slice(&u16::try_from(2 + 6 + tiff.len()).ok()?.to_be_bytes());
            out.extend_from_slice(b"Exif\0\0");
            out.extend_from_slice(&tiff);
        }
        if keep {
            out.extend_from_slice(&[0xFF, marker]);
            out.extend_from_slice(&b[after..end]);
        }
        at = end;
        if marker == 0xDA {
            // Entropy-coded data runs to the next marker that is neither a
            // stuffed 0xFF 0x00 nor a restart marker.
            let mut p = at;
            loop {
                let Some(offset) = b.get(p..)?.iter().position(|&byte| byte == 0xFF) else {
                    out.extend_from_slice(&b[at..]);
                    return Some(out);
                };
                let ff = p + offset;
                match b.get(ff + 1) {
                    None => {
                        out.extend_from_slice(&b[at..]);
                        return Some(out);
                    }
                    Some(0x00 | 0xD0..=0xD7 | 0xFF) => p = ff + 1,
                    Some(_) => {
                        out.extend_from_slice(&b[at..ff]);
                        at = ff;
                        break;
                    }
                }
            }
        }
    }
}

/// PNG: drops `eXIf` and the text and time chunks (`tEXt`, `zTXt`, `iTXt`,
/// `tIME`); a non-upright orientation comes back as a minimal `eXIf` before
/// the first `IDAT`.
fn png(b: &[u8], orientation: Orientation) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(b.len());
    out.extend_from_slice(b.get(..8)?);
    let mut exif = orientation_exif(orientation);
    let mut at = 8;
    while at < b.len() {
        let len = usize::try_from(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?)).ok()?;
        let kind: [u8; 4] = b.get(at + 4..at + 8)?.try_into().ok()?;
        let end = at.checked_add(12)?.checked_add(len)?;
        let chunk = b.get(at..end)?;
        if &kind == b"IDAT"
            && let Some(tiff) = exif.take()
        {
            out.extend_from_slice(&png_chunk(b"eXIf", &tiff)?);
        }
        if !matches!(&kind, b"eXIf" | b"tEXt" | b"zTXt" | b"iTXt" | b"tIME") {
            out.extend_from_slice(chunk);
        }
        at = end;
        if &kind == b"IEND" {
            break;
        }
    }
    Some(out)
}

fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Option<Vec<u8>> {
    let mut chunk = Vec::with_capacity(12 + data.len());
    chunk.extend_from_slice(&u32::try_from(data.len()).ok()?.to_be_bytes());
    chunk.extend_from_slice(kind);
    chunk.extend_from_slice(data);
    let mut crc = crc32fast::Hasher::new();
    crc.update(kind);
    crc.update(data);
    chunk.extend_from_slice(&crc.finalize().to_be_bytes());
    Some(chunk)
}

/// WebP: drops the `EXIF` and `XMP ` chunks and clears their flags in the
/// `VP8X` header; a non-upright orientation comes back as a minimal `EXIF`
/// chunk at the end, where the container puts it.
fn webp(b: &[u8], orientation: Orientation) -> Option<Vec<u8>> {
    const EXIF_FLAG: u8 = 0x08;
    const XMP_FLAG: u8 = 0x04;
    let mut out = Vec::with_capacity(b.len());
    out.extend_from_slice(b.get(..12)?);
    let mut vp8x_flags = None;
    let mut at = 12;
    while at + 8 <= b.len() {
        let kind: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
        let len =
            usize::try_from(u32::from_le_bytes(b.get(at + 4..at + 8)?.try_into().ok()?)).ok()?;
        let end = (at + 8)
            .checked_add(len)?
            .checked_add(len % 2)?
            .min(b.len());
        let chunk = b.get(at..end)?;
        if &kind == b"VP8X" {
            vp8x_flags = Some(out.len() + 8);
        }
        if !matches!(&kind, b"EXIF" | b"XMP ") {
            out.extend_from_slice(chunk);
        }
        at = end;
    }
    let exif = orientation_exif(orientation);
    if let Some(flags) = vp8x_flags {
        let byte = out.get_mut(flags)?;
        *byte &= !(EXIF_FLAG | XMP_FLAG);
        if exif.is_some() {
            *byte |= EXIF_FLAG;
        }
        // A simple (VP8/VP8L only) file has no place for EXIF: without
        // VP8X the orientation is not kept, as decoders would ignore it.
        if let Some(tiff) = exif {
            out.extend_from_slice(b"EXIF");
            out.extend_from_slice(&u32::try_from(tiff.len()).ok()?.to_le_bytes());
            out.extend_from_slice(&tiff);
            if tiff.len() % 2 == 1 {
                out.push(0);
            }
        }
    }
    let riff_size = u32::try_from(out.len() - 8).ok()?;
    out.get_mut(4..8)?.copy_from_slice(&riff_size.to_le_bytes());
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{DynamicImage, ImageDecoder, ImageFormat, Rgb, RgbImage};
    use std::io::Cursor;

    fn picture() -> DynamicImage {
        DynamicImage::ImageRgb8(RgbImage::from_fn(24, 16, |x, y| {
            Rgb([(x * 10) as u8, (y * 15) as u8, ((x + y) * 5) as u8])
        }))
    }

    fn encoded(format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        picture().write_to(&mut out, format).expect("encode");
        out.into_inner()
    }

    /// An EXIF block (little-endian, as cameras write it) with an
    /// orientation and a GPS directory pointer.
    fn camera_exif(orientation: u16) -> Vec<u8> {
        let mut tiff = b"II\x2a\x00\x08\x00\x00\x00\x02\x00".to_vec();
        tiff.extend_from_slice(&[0x12, 0x01, 3, 0, 1, 0, 0, 0]);
        tiff.extend_from_slice(&orientation.to_le_bytes());
        tiff.extend_from_slice(&[0, 0]);
        tiff.extend_from_slice(&[0x25, 0x88, 4, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
        tiff.extend_from_slice(&[0, 0, 0, 0]);
        tiff
    }

    fn orientation_of(bytes: &[u8], format: ImageFormat) -> Orientation {
        let mut decoder = image::ImageReader::with_format(Cursor::new(bytes), format)
            .into_decoder()
            .expect("decoder");
        decoder.orientation().expect("orientation")
    }

    fn pixels(bytes: &[u8]) -> RgbImage {
        image::load_from_memory(bytes).expect("decodes").to_rgb8()
    }

    fn contains(bytes: &[u8], needle: &[u8]) -> bool {
        bytes.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn jpeg_loses_exif_xmp_and_comments_and_keeps_icc_and_the_orientation() {
        let plain = encoded(ImageFormat::Jpeg);
        let segment = |marker: u8, payload: &[u8]| {
            let mut s = vec![0xFF, marker];
            s.extend_from_slice(&u16::try_from(payload.len() + 2).unwrap().to_be_bytes());
            s.extend_from_slice(payload);
            s
        };
        let mut exif = b"Exif\0\0".to_vec();
        exif.extend_from_slice(&camera_exif(6));
        let mut bytes = plain[..2].to_vec();
        bytes.extend(segment(0xE1, &exif));
        bytes.extend(segment(0xE1, b"http://ns.adobe.com/xap/1.0/\0<x:xmpmeta/>"));
        bytes.extend(segment(0xE2, b"ICC_PROFILE\0\x01\x01profile"));
        bytes.extend(segment(0xFE, b"a comment"));
        bytes.extend_from_slice(&plain[2..]);
        bytes.extend_from_slice(b"appended video");
        assert_eq!(
            orientation_of(&bytes, ImageFormat::Jpeg),
            Orientation::Rotate90
        );
        // Validation reads the same orientation, which stripping is given.
        assert_eq!(
            crate::images::convert::validate(
                &bytes,
                Format::Jpeg,
                1 << 30,
                crate::images::convert::DecodeAllowance::UNLIMITED
            )
            .expect("valid"),
            Orientation::Rotate90
        );

        let stripped = strip(&bytes, Format::Jpeg, Orientation::Rotate90).expect("stripped");
        assert!(!contains(&stripped, &[0x25, 0x88]), "no GPS pointer");
        assert!(!contains(&stripped, b"xmpmeta") && !contains(&stripped, b"comment"));
        assert!(!contains(&stripped, b"appended"), "nothing after the image");
        assert!(contains(&stripped, b"ICC_PROFILE\0"));
        assert_eq!(
            orientation_of(&stripped, ImageFormat::Jpeg),
            Orientation::Rotate90
        );
        assert_eq!(pixels(&stripped), pixels(&bytes));

        // Nothing to remove: nothing changes.
        assert_eq!(strip(&plain, Format::Jpeg, Orientation::NoTransforms), None);
    }

    fn png_chunks(bytes: &[u8]) -> Vec<[u8; 4]> {
        let mut kinds = Vec::new();
        let mut at = 8;
        while at + 8 <= bytes.len() {
            let len = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            kinds.push(bytes[at + 4..at + 8].try_into().unwrap());
            at += 12 + len;
        }
        kinds
    }

    #[test]
    fn png_loses_text_and_exif_chunks_and_keeps_the_orientation() {
        let plain = encoded(ImageFormat::Png);
        // After IHDR: a tEXt and an eXIf with GPS.
        let ihdr_end = 8 + 12 + 13;
        let mut bytes = plain[..ihdr_end].to_vec();
        bytes.extend(png_chunk(b"tEXt", b"Author\0someone").unwrap());
        bytes.extend(png_chunk(b"eXIf", &camera_exif(3)).unwrap());
        bytes.extend_from_slice(&plain[ihdr_end..]);
        assert_eq!(
            orientation_of(&bytes, ImageFormat::Png),
            Orientation::Rotate180
        );

        let stripped = strip(&bytes, Format::Png, Orientation::Rotate180).expect("stripped");
        let kinds = png_chunks(&stripped);
        assert!(!kinds.contains(b"tEXt"), "{kinds:?}");
        assert!(!contains(&stripped, &[0x25, 0x88]), "no GPS pointer");
        assert_eq!(
            orientation_of(&stripped, ImageFormat::Png),
            Orientation::Rotate180
        );
        assert_eq!(pixels(&stripped), pixels(&bytes));

        let upright = strip(&bytes, Format::Png, Orientation::NoTransforms).expect("stripped");
        assert_eq!(png_chunks(&upright), png_chunks(&plain));
    }

    #[test]
    fn webp_loses_exif_and_xmp_chunks_and_their_flags() {
        // The encoder writes a simple lossless file; wrap it as an extended one.
        let simple = encoded(ImageFormat::WebP);
        let riff_chunk = |kind: &[u8; 4], data: &[u8]| {
            let mut c = kind.to_vec();
            c.extend_from_slice(&u32::try_from(data.len()).unwrap().to_le_bytes());
            c.extend_from_slice(data);
            if data.len() % 2 == 1 {
                c.push(0);
            }
            c
        };
        let mut vp8x = vec![0x08 | 0x04, 0, 0, 0];
        vp8x.extend_from_slice(&[23, 0, 0, 15, 0, 0]);
        let mut body = b"WEBP".to_vec();
        body.extend(riff_chunk(b"VP8X", &vp8x));
        body.extend_from_slice(&simple[12..]);
        body.extend(riff_chunk(b"EXIF", &camera_exif(1)));
        body.extend(riff_chunk(b"XMP ", b"<x:xmpmeta/>"));
        let mut bytes = b"RIFF".to_vec();
        bytes.extend_from_slice(&u32::try_from(body.len()).unwrap().to_le_bytes());
        bytes.extend(body);
        assert_eq!(pixels(&bytes), picture().to_rgb8());

        let stripped = strip(&bytes, Format::Webp, Orientation::NoTransforms).expect("stripped");
        assert!(!contains(&stripped, b"EXIF") && !contains(&stripped, b"XMP "));
        assert_eq!(stripped[20] & (0x08 | 0x04), 0, "flags cleared");
        assert_eq!(
            u32::from_le_bytes(stripped[4..8].try_into().unwrap()) as usize,
            stripped.len() - 8
        );
        assert_eq!(pixels(&stripped), picture().to_rgb8());
    }
}

/// Cut short or with a byte flipped anywhere, real files never make the
/// header reader, the validation or the stripping panic.
#[cfg(test)]
mod robustness {
    use super::*;
    use crate::images::{convert, sniff};

    const FILES: [(&[u8], Format); 4] = [
        (
            include_bytes!("../../tests/fixtures/real-world/photoshop-200dpi-broken.jpg"),
            Format::Jpeg,
        ),
        (
            include_bytes!("../../tests/fixtures/real-world/exif_gps.jpg"),
            Format::Jpeg,
        ),
        (
            include_bytes!("../../tests/fixtures/real-world/broken_data_stream.png"),
            Format::Png,
        ),
        (
            include_bytes!("../../tests/fixtures/real-world/decompression_bomb.gif"),
            Format::Gif,
        ),
    ];

    fn exercise(bytes: &[u8], format: Format) {
        let _ = sniff::dimensions(bytes);
        let _ = convert::validate(bytes, format, 1 << 22, convert::DecodeAllowance::UNLIMITED);
        let _ = strip(bytes, format, Orientation::Rotate90);
        let _ = strip(bytes, format, Orientation::NoTransforms);
    }

    #[test]
    fn truncated_or_flipped_real_files_never_panic() {
        for (file, format) in FILES {
            let step = (file.len() / 150).max(1);
            for len in (0..file.len()).step_by(step) {
                exercise(&file[..len], format);
                let mut flipped = file.to_vec();
                flipped[len] ^= 0xA5;
                exercise(&flipped, format);
            }
        }
    }
}
