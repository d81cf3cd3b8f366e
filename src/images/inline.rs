//! Data URIs: written while a fetched body streams in, and parsed and
//! checked when a client sends one.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use bytes::Bytes;

use super::cache::FetchedImage;
use super::data_uri::DataUri;
use super::fetch::Sink;
use super::sniff::{self, Format};
use super::{ErrorKind, ImageError, convert};

/// Base64 as clients write it in data URIs: with or without padding.
pub const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Enough bytes for every magic number [`sniff::format`] knows.
const SNIFF_BYTES: usize = 16;
/// While the body is shorter than this, each chunk retries the header, so a
/// bomb's dimensions stop the download early; later the complete body decides.
const EARLY_HEADER_BYTES: usize = 256 * 1024;
/// `data:image/jpeg;base64,` and its longer siblings.
const PREFIX_MAX: usize = 32;

pub fn data_uri_prefix(format: Format) -> String {
    format!("data:{};base64,", format.mime())
}

/// `data:<mime>;base64,<bytes>`, written into one string of the final size.
pub fn data_uri(format: Format, bytes: &[u8]) -> String {
    let prefix = data_uri_prefix(format);
    let encoded_len = base64::encoded_len(bytes.len(), true).unwrap_or(0);
    let mut uri = String::with_capacity(prefix.len() + encoded_len);
    uri.push_str(&prefix);
    STANDARD.encode_string(bytes, &mut uri);
    uri
}

/// The format and dimensions of `bytes`, from magic number and header
/// alone, within the pixel cap: what makes them an image to Iris.
pub fn inspect(bytes: &[u8], max_pixels: u64) -> Result<(Format, (u32, u32)), ImageError> {
    let format = sniff::format(bytes).ok_or_else(not_an_image)?;
    let dims = sniff::dimensions(bytes).ok_or_else(|| {
        ImageError::new(
            ErrorKind::FormatUnsupported,
            "bad_header",
            format!("The {format} image's header could not be read."),
        )
    })?;
    check_pixels(dims, max_pixels)?;
    Ok((format, dims))
}

fn not_an_image() -> ImageError {
    ImageError::new(
        ErrorKind::FormatUnsupported,
        "not_an_image",
        "The content is not an image in a format Iris recognises (JPEG, PNG, WebP, GIF, BMP, TIFF).",
    )
}

fn check_pixels((width, height): (u32, u32), max_pixels: u64) -> Result<(), ImageError> {
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(convert::too_many_pixels(width, height, max_pixels));
    }
    Ok(())
}

/// Receives a fetched body and, as it arrives, sniffs its format, checks
/// its header against the pixel cap, and base64-encodes it into the data
/// URI: the encoding overlaps the download, and the image ends up in one
/// buffer of bytes and one of base64, nothing more.
pub struct InliningSink {
    body: Vec<u8>,
    uri: String,
    /// Bytes of `body` already in `uri`; always a multiple of 3 until the end.
    encoded: usize,
    format: Option<Format>,
    dims: Option<(u32, u32)>,
    max_pixels: u64,
}

impl InliningSink {
    pub fn new(max_pixels: u64) -> Self {
        Self {
            body: Vec::new(),
            uri: String::new(),
            encoded: 0,
            format: None,
            dims: None,
            max_pixels,
        }
    }

    fn start(&mut self) -> Result<Format, ImageError> {
        let format = sniff::format(&self.body).ok_or_else(not_an_image)?;
        self.uri.push_str(&data_uri_prefix(format));
        self.format = Some(format);
        Ok(format)
    }

    /// Encodes every complete 3-byte group not yet encoded: base64 of whole
    /// groups needs no padding, so the pieces concatenate exactly.
    fn encode_groups(&mut self) {
        let end = self.encoded + (self.body.len() - self.encoded) / 3 * 3;
        STANDARD.encode_string(&self.body[self.encoded..end], &mut self.uri);
        self.encoded = end;
    }

    /// The inspected image, with its data URI.
    pub fn finish(mut self) -> Result<FetchedImage, ImageError> {
        let format = match self.format {
            Some(format) => format,
            None => self.start()?,
        };
        // A GIF's later frames can grow its canvas: judged on the whole body.
        let dims = match self.dims {
            Some(dims) if format != Format::Gif => dims,
            _ => inspect(&self.body, self.max_pixels)?.1,
        };
        STANDARD.encode_string(&self.body[self.encoded..], &mut self.uri);
        Ok(FetchedImage {
            bytes: Bytes::from(self.body),
            data_uri: Arc::new(self.uri),
            format,
            width: dims.0,
            height: dims.1,
            checked: tokio::sync::OnceCell::new(),
        })
    }
}

impl Sink for InliningSink {
    fn expect(&mut self, declared: usize) {
        self.body.reserve_exact(declared);
        self.uri
            .reserve_exact(PREFIX_MAX + base64::encoded_len(declared, true).unwrap_or(0));
    }

    fn push(&mut self, chunk: &[u8]) -> Result<(), ImageError> {
        self.body.extend_from_slice(chunk);
        let format = match self.format {
            Some(format) => format,
            None if self.body.len() < SNIFF_BYTES => return Ok(()),
            // Not an image: stop downloading it now.
            None => self.start()?,
        };
        // TIFF keeps its dimensions anywhere in the file: checked at the end.
        if self.dims.is_none()
            && format != Format::Tiff
            && self.body.len() <= EARLY_HEADER_BYTES
            && let Some(dims) = sniff::dimensions(&self.body)
        {
            check_pixels(dims, self.max_pixels)?;
            self.dims = Some(dims);
        }
        self.encode_groups();
        Ok(())
    }
}

/// A client's data URI, parsed and held to what Iris accepts: base64 and
/// not empty.
pub fn checked_data_uri(uri: &str) -> Result<DataUri<'_>, ImageError> {
    let malformed = |what: &dyn std::fmt::Display| {
        ImageError::new(
            ErrorKind::InvalidData,
            "data_uri",
            format!("The data URI is malformed: {what}."),
        )
    };
    let parsed = DataUri::parse(uri).map_err(|e| malformed(&e))?;
    if !parsed.base64 {
        return Err(malformed(
            &"only base64 data URIs are accepted (data:image/png;base64,...)",
        ));
    }
    if parsed.data.is_empty() {
        return Err(malformed(&"it carries no data"));
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::images::test_png as png;

    #[test]
    fn streamed_data_uri_equals_the_one_shot_encoding_for_any_chunking() {
        let mut bytes = png(33, 17);
        bytes.extend((0..1000u32).map(|i| (i * 7) as u8));
        for chunk in [1, 2, 3, 4, 5, 7, 16, 64, 1000, bytes.len()] {
            let mut sink = InliningSink::new(u64::MAX);
            sink.expect(bytes.len());
            for piece in bytes.chunks(chunk) {
                sink.push(piece).expect("push");
            }
            let image = sink.finish().expect("image");
            assert_eq!(
                *image.data_uri,
                data_uri(Format::Png, &bytes),
                "chunks of {chunk}"
            );
            assert_eq!(&image.bytes[..], &bytes[..]);
            assert_eq!(
                (image.format, image.width, image.height),
                (Format::Png, 33, 17)
            );
        }
    }

    #[test]
    fn refuses_early_what_is_not_an_image_or_too_many_pixels() {
        let mut sink = InliningSink::new(u64::MAX);
        let e = sink
            .push(b"<!doctype html><html>")
            .expect_err("not an image");
        assert_eq!(e.kind, ErrorKind::FormatUnsupported);

        let mut sink = InliningSink::new(1_000_000);
        let e = sink
            .push(b"GIF89a\xff\xff\xff\xff\x00\x00\x00\x00\x00\x00")
            .expect_err("a bomb's header");
        assert_eq!(e.kind, ErrorKind::TooLarge);

        // Tiny bodies are judged at the end.
        let mut sink = InliningSink::new(u64::MAX);
        sink.push(b"GIF8").expect("too short to judge");
        assert_eq!(
            sink.finish().expect_err("not an image").kind,
            ErrorKind::FormatUnsupported
        );
    }

    #[test]
    fn data_uris_are_parsed_strictly() {
        let parts = |uri| {
            let parsed = checked_data_uri(uri).expect("ok");
            (parsed.media_type, parsed.data)
        };
        assert_eq!(parts("data:image/png;base64,AAAA"), ("image/png", "AAAA"));
        assert_eq!(
            parts("DATA:image/png;name=x.png;BASE64,AAAA"),
            ("image/png", "AAAA")
        );
        assert_eq!(parts("data:;base64,AAAA"), ("", "AAAA"));
        for bad in [
            "data:image/png,AAAA",
            "data:image/png;base64",
            "data:image/png;base64,",
            "image/png;base64,AAAA",
            "data:",
            "dat",
            "data:\u{e9}\u{e9}\u{e9}\u{e9},x",
        ] {
            let e = checked_data_uri(bad).expect_err(bad);
            assert_eq!(e.kind, ErrorKind::InvalidData, "{bad}");
        }
    }

    #[test]
    fn data_uri_output_is_exact() {
        assert_eq!(
            data_uri(Format::Jpeg, b"\xff\xd8\xff"),
            "data:image/jpeg;base64,/9j/"
        );
    }
}
