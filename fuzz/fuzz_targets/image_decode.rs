//! Image bytes: sniffing the format and the header's dimensions, the
//! pixel-cap check, and decoding, converting, downscaling and fitting under
//! small pixel and byte limits (so every input finishes quickly).
//!
//! The input is the image file itself; a checksum of it picks one of a few
//! upstream targets, so seeds stay plain image files. Properties:
//! - nothing panics, whatever the bytes;
//! - no format means no dimensions, and dimensions are never zero;
//! - `inspect` agrees with `format` and `dimensions` and holds the pixel cap;
//! - what `transform` returns is an image of the format it says, of the
//!   dimensions it says, and one the target accepts;
//! - `validate` refuses only as unsupported (damaged) or too large, and an
//!   image it passes keeps its format and dimensions once stripped of its
//!   metadata;
//! - the memory layout and needs read from the header never panic, and
//!   both run under the decoder allowance the decode budget would give.
#![no_main]

use iris::images::memory::Layout;
use iris::images::sniff::{self, Format, FormatSet};
use iris::images::{ErrorKind, Target, convert, inline, metadata};
use libfuzzer_sys::fuzz_target;

const MAX_PIXELS: u64 = 64 * 64;

fn target(choice: u8) -> Target {
    let formats = |f: &[Format]| FormatSet::of(f);
    match choice % 4 {
        // Another format.
        0 => Target {
            formats: formats(&[Format::Png]),
            max_bytes: None,
            max_side: None,
        },
        1 => Target {
            formats: formats(&[Format::Jpeg]),
            max_bytes: None,
            max_side: None,
        },
        // `detail: "low"` downscaling, scaled down to these limits.
        2 => Target {
            formats: formats(&[Format::Jpeg, Format::Png, Format::Webp, Format::Gif]),
            max_bytes: None,
            max_side: Some(16),
        },
        // Fitting under max_image_bytes.
        _ => Target {
            formats: formats(&[Format::Jpeg, Format::Png, Format::Webp]),
            max_bytes: Some(600),
            max_side: None,
        },
    }
}

fuzz_target!(|bytes: &[u8]| {
    let format = sniff::format(bytes);
    let dims = sniff::dimensions(bytes);
    if format.is_none() {
        assert_eq!(dims, None, "no format, no dimensions");
    }
    if let Some((w, h)) = dims {
        assert!(w > 0 && h > 0, "{w}x{h}");
    }

    let (format, dims) = match inline::inspect(bytes, MAX_PIXELS) {
        Ok(found) => found,
        Err(e) => {
            assert!(
                matches!(e.kind, ErrorKind::FormatUnsupported | ErrorKind::TooLarge),
                "{e:?}"
            );
            return;
        }
    };
    assert_eq!(Some(format), sniff::format(bytes));
    assert_eq!(Some(dims), sniff::dimensions(bytes));
    assert!(u64::from(dims.0) * u64::from(dims.1) <= MAX_PIXELS);

    // What the decode budget would reserve, and the decoder's allowance
    // that follows from it, under which everything below runs.
    let layout = Layout::of(bytes, format, dims);
    let _ = layout.decode_need();
    match convert::validate(bytes, format, MAX_PIXELS, layout.allowance()) {
        Ok(orientation) => {
            if let Some(stripped) = metadata::strip(bytes, format, orientation) {
                assert_eq!(sniff::format(&stripped), Some(format));
                assert_eq!(sniff::dimensions(&stripped), Some(dims));
            }
        }
        Err(e) => {
            assert!(
                matches!(e.kind, ErrorKind::FormatUnsupported | ErrorKind::TooLarge),
                "{e:?}"
            );
        }
    }

    let choice = bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b));
    let target = target(choice);
    let _ = layout.transform_need(&target);
    match convert::transform(bytes, format, &target, MAX_PIXELS, layout.allowance()) {
        Ok(encoded) => {
            assert!(
                target.formats.contains(encoded.format),
                "{:?}",
                encoded.format
            );
            assert_eq!(sniff::format(&encoded.bytes), Some(encoded.format));
            assert_eq!(
                sniff::dimensions(&encoded.bytes),
                Some((encoded.width, encoded.height)),
                "the header says what transform says"
            );
            assert!(
                target.accepts(
                    encoded.format,
                    encoded.bytes.len(),
                    (encoded.width, encoded.height)
                ),
                "{} bytes, {}x{} not accepted by {target:?}",
                encoded.bytes.len(),
                encoded.width,
                encoded.height
            );
        }
        Err(e) => {
            assert!(
                matches!(e.kind, ErrorKind::FormatUnsupported | ErrorKind::TooLarge),
                "{e:?}"
            );
        }
    }
});
