//! Data URIs and base64: the RFC 2397 parser, the client-facing check, the
//! budget estimate's header peek, and `Images::process_data_uri` (decode,
//! inspect, convert) under small byte and pixel limits.
//!
//! The first input byte picks the shape: even, the rest is the URI as a
//! client wrote it; odd, the rest is image bytes sent as
//! `data:image/png;base64,<base64 of them>` (so the fuzzer mutates the image
//! itself, not its encoding). Properties:
//! - nothing panics;
//! - the parsed parts are pieces of the URI, and the check agrees with them;
//! - an image costs between the low-detail and the worst-case estimate;
//! - `process_data_uri` refuses for size exactly when the decoded bytes are
//!   over the limit, and what it returns is a data URI the target accepts.
#![no_main]

use std::sync::OnceLock;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use iris::budget::estimate::{self, LOW_DETAIL_TOKENS, WORST_CASE_IMAGE_TOKENS};
use iris::images::data_uri::{DataUri, DataUriError, is_data_uri};
use iris::images::inline::{self, BASE64};
use iris::images::{ErrorKind, Format, FormatSet, Images, ImagesSettings, Target};
use libfuzzer_sys::fuzz_target;

const MAX_BYTES: usize = 64 * 1024;
const MAX_PIXELS: u64 = 128 * 128;

struct World {
    runtime: tokio::runtime::Runtime,
    images: Images,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let mut settings = ImagesSettings::default();
        settings.fetch.max_bytes = MAX_BYTES;
        settings.max_pixels = MAX_PIXELS;
        settings.cache_bytes = 0;
        let images = runtime.block_on(async { Images::new(&settings).expect("images") });
        World { runtime, images }
    })
}

/// An upstream that takes anything, and one that needs most images changed.
fn targets() -> [Target; 2] {
    [
        Target {
            formats: FormatSet::of(&Format::ALL),
            max_bytes: None,
            max_side: None,
        },
        Target {
            formats: FormatSet::of(&[Format::Jpeg, Format::Png]),
            max_bytes: Some(1500),
            max_side: Some(24),
        },
    ]
}

fuzz_target!(|data: &[u8]| {
    let Some((&shape, rest)) = data.split_first() else {
        return;
    };
    let uri = if shape % 2 == 1 {
        format!("data:image/png;base64,{}", STANDARD.encode(rest))
    } else {
        match std::str::from_utf8(rest) {
            Ok(text) => text.to_owned(),
            Err(_) => return,
        }
    };
    let uri = uri.as_str();

    // The parser: parts are pieces of the URI.
    match DataUri::parse(uri) {
        Err(DataUriError::NotData) => assert!(!is_data_uri(uri)),
        Err(DataUriError::NoComma) => {
            assert!(is_data_uri(uri));
            assert!(!uri[5..].contains(','));
        }
        Ok(parsed) => {
            assert!(is_data_uri(uri));
            assert!(uri.ends_with(parsed.data));
            let header = &uri[5..uri.len() - parsed.data.len() - 1];
            assert!(!header.contains(','), "data starts after the first comma");
            assert!(header.contains(parsed.media_type));
            assert!(!parsed.media_type.contains(';'));
            if parsed.base64 {
                assert!(header.to_ascii_lowercase().trim_end().ends_with("base64"));
            }
        }
    }
    let checked = inline::checked_data_uri(uri);
    match &checked {
        Ok(parsed) => {
            assert!(parsed.base64 && !parsed.data.is_empty());
            assert_eq!(Ok(*parsed), DataUri::parse(uri));
        }
        Err(e) => assert_eq!(e.kind, ErrorKind::InvalidData),
    }

    // The estimate's header peek.
    for detail in [None, Some("low"), Some("high"), Some("LOW")] {
        let tokens = estimate::image_tokens(uri, detail);
        assert!(
            (LOW_DETAIL_TOKENS..=WORST_CASE_IMAGE_TOKENS).contains(&tokens),
            "{tokens} tokens"
        );
    }

    // Validation and conversion.
    let world = world();
    let decoded = checked.ok().map(|parsed| BASE64.decode(parsed.data));
    for target in targets() {
        let result = world.runtime.block_on(world.images.process_data_uri(
            uri,
            &bytes::Bytes::new(),
            target,
        ));
        match (&decoded, &result) {
            (Some(Ok(bytes)), Err(e)) if bytes.len() <= MAX_BYTES => {
                assert!(
                    e.reason != "bytes",
                    "{} bytes refused as too many",
                    bytes.len()
                )
            }
            (Some(Ok(bytes)), result) if bytes.len() > MAX_BYTES => {
                assert!(
                    matches!(result, Err(e) if e.kind == ErrorKind::TooLarge),
                    "{} bytes not refused: {result:?}",
                    bytes.len()
                )
            }
            (Some(Err(_)), result) => assert!(
                matches!(result, Err(e) if matches!(e.kind, ErrorKind::InvalidData | ErrorKind::TooLarge)),
                "invalid base64 not refused: {result:?}"
            ),
            _ => {}
        }
        match result {
            Ok(None) => {
                let Some(Ok(bytes)) = &decoded else {
                    panic!("accepted without valid base64");
                };
                let (format, dims) =
                    inline::inspect(bytes, MAX_PIXELS).expect("accepted: an image");
                assert!(target.accepts(format, bytes.len(), dims));
                assert!(DataUri::parse(uri).is_ok_and(|d| d.declares(format.mime())));
            }
            Ok(Some(out)) => {
                let parsed = inline::checked_data_uri(&out).expect("Iris's own data URI");
                let bytes = BASE64.decode(parsed.data).expect("Iris's own base64");
                let (format, dims) = inline::inspect(&bytes, MAX_PIXELS).expect("Iris's own image");
                assert!(parsed.declares(format.mime()), "declared as what it is");
                assert!(
                    target.accepts(format, bytes.len(), dims),
                    "{format} {dims:?} {} bytes not accepted by {target:?}",
                    bytes.len()
                );
            }
            Err(e) => {
                assert!(!e.message.is_empty());
                assert_ne!(e.kind, ErrorKind::Forbidden);
                assert_ne!(e.kind, ErrorKind::FetchFailed);
            }
        }
    }
});
