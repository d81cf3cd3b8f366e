//! Genuine files from a public image test suite (Pillow's; see
//! `tests/fixtures/real-world/SOURCES.md`), each sent both as a client's
//! `data:` URI and as a URL Iris fetches: lenient on metadata as mainstream
//! decoders are, strict on pixel data, each failure with the contract's code,
//! refused before any upstream call and without charging the budget; and
//! metadata (GPS included) removed on request.

use super::*;

/// A file of the public suite (`real-world/`), or an input the fuzzers
/// found (`fuzz/`).
fn fixture(name: &str) -> Vec<u8> {
    let dir = if name.starts_with("gif-zero") {
        "fuzz"
    } else {
        "real-world"
    };
    let path = format!("{}/tests/fixtures/{dir}/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Client `b` has a daily token budget, so a charge would show in its usage.
async fn setup_with(upstream_keys: &str, images: &str) -> Setup {
    let upstream = MockUpstream::start().await;
    let host = ImageServer::start(IMAGE_HOST).await;
    let extra =
        format!("[clients.budget]\ntokens_per_day = 1000000\n\n[images]\n{ALLOW_HOST}\n{images}\n");
    let config = base_config(&upstream.base_url(), &extra).replacen(
        "timeout_ms = 2000\n",
        &format!("timeout_ms = 2000\n{upstream_keys}\n"),
        1,
    );
    let iris = Iris::start(&config).await;
    Setup {
        upstream,
        host,
        iris,
    }
}

/// The file as a client's data URI (declared with `mime`), and as a URL on
/// the image host.
fn both_ways(s: &Setup, name: &str, mime: &str) -> [(&'static str, String); 2] {
    let bytes = fixture(name);
    s.host.add(name, "application/octet-stream", bytes.clone());
    [
        (
            "data URI",
            format!("data:{mime};base64,{}", BASE64.encode(&bytes)),
        ),
        ("URL", s.host.url(&format!("/files/{name}"))),
    ]
}

/// Sends one image as client `b`: the status and answer.
async fn send_b(s: &Setup, url: &str) -> (u16, Value) {
    let response = s
        .iris
        .chat(KEY_B, &body_with_images(&[(url, None)]), &[])
        .await;
    let status = response.status().as_u16();
    (status, response.json().await.expect("JSON"))
}

/// `name`, sent both ways, is refused with `code` naming the image, before
/// any upstream call, and client `b`'s budget is untouched.
async fn refused_both_ways(s: &Setup, name: &str, mime: &str, code: &str) {
    for (how, url) in both_ways(s, name, mime) {
        let (status, answer) = send_b(s, &url).await;
        assert_eq!(status, 400, "{name} as a {how}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{name} as a {how}: {answer}");
        assert_eq!(answer["error"]["param"], PARAM, "{name} as a {how}");
        assert_eq!(answer["error"]["type"], "invalid_request_error");
        assert_eq!(
            s.upstream.requests(),
            0,
            "{name} as a {how} reached upstream"
        );
        assert_eq!(
            s.iris.used(KEY_B, "tokens_per_day").await,
            0,
            "{name} as a {how} was charged"
        );
    }
}

#[tokio::test]
async fn an_editor_jpeg_with_a_broken_metadata_segment_is_forwarded_as_it_is() {
    let s = setup_with(INLINE, "").await;
    let name = "photoshop-200dpi-broken.jpg";
    for (how, url) in both_ways(&s, name, "image/jpeg") {
        let (status, answer) = send_b(&s, &url).await;
        assert_eq!(status, 200, "{how}: {answer}");
        let (mime, bytes) = s.inlined(1);
        assert_eq!(mime, "image/jpeg", "{how}");
        assert!(bytes == fixture(name), "{how}: the file, byte for byte");
    }
    assert_eq!(s.upstream.requests(), 2);
}

#[tokio::test]
async fn a_png_with_a_corrupt_data_stream_is_refused_before_the_upstream_and_the_budget() {
    let s = setup_with(INLINE, "").await;
    refused_both_ways(
        &s,
        "broken_data_stream.png",
        "image/png",
        "image_format_unsupported",
    )
    .await;
}

#[tokio::test]
async fn a_gif_whose_frame_declares_billions_of_pixels_is_too_large() {
    let s = setup_with(INLINE, "").await;
    refused_both_ways(&s, "decompression_bomb.gif", "image/gif", "image_too_large").await;
    // And where GIFs are converted for the upstream, too.
    let s = setup_with(&format!("{INLINE}\n{WEB_FORMATS}"), "").await;
    refused_both_ways(&s, "decompression_bomb.gif", "image/gif", "image_too_large").await;
}

/// Found by the image_decode fuzz target: a GIF 3 pixels wide and 0 high,
/// once converted to a PNG of no pixels. Refused, forwarded or converted.
#[tokio::test]
async fn a_gif_with_a_side_of_zero_is_refused() {
    for keys in [INLINE.to_owned(), format!("{INLINE}\n{WEB_FORMATS}")] {
        let s = setup_with(&keys, "").await;
        refused_both_ways(
            &s,
            "gif-zero-height.gif",
            "image/gif",
            "image_format_unsupported",
        )
        .await;
    }
}

/// The GPS IFD pointer tag (0x8825) as it appears in a big- or little-endian
/// EXIF directory entry, and the EXIF header.
fn has_gps_or_exif(bytes: &[u8]) -> bool {
    let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    contains(b"Exif\0\0")
        || contains(&[0x88, 0x25, 0x00, 0x04])
        || contains(&[0x25, 0x88, 0x04, 0x00])
}

#[tokio::test]
async fn metadata_is_forwarded_unless_stripping_is_on_and_then_gps_is_gone() {
    let name = "exif_gps.jpg";
    let original = fixture(name);
    assert!(has_gps_or_exif(&original), "the fixture carries GPS");

    // Off (the default): byte for byte, GPS and all.
    let s = setup_with(INLINE, "").await;
    for (how, url) in both_ways(&s, name, "image/jpeg") {
        assert_eq!(send_b(&s, &url).await.0, 200, "{how}");
        assert!(s.inlined(1).1 == original, "{how}: forwarded as it is");
    }

    // On: no EXIF and no GPS reach the upstream; the pixels are the same.
    let s = setup_with(INLINE, "strip_metadata = true").await;
    for (how, url) in both_ways(&s, name, "image/jpeg") {
        let (status, answer) = send_b(&s, &url).await;
        assert_eq!(status, 200, "{how}: {answer}");
        let (mime, sent) = s.inlined(1);
        assert_eq!(mime, "image/jpeg");
        assert!(!has_gps_or_exif(&sent), "{how}: metadata removed");
        assert!(sent.len() < original.len(), "{how}");
        let decoded = |b: &[u8]| image::load_from_memory(b).expect("decodes").to_rgb8();
        assert_eq!(decoded(&sent), decoded(&original), "{how}: same pixels");
    }
}

#[tokio::test]
async fn stripping_removes_xmp_and_photoshop_data_and_keeps_the_pixels() {
    let name = "photoshop-200dpi-broken.jpg";
    let original = fixture(name);
    let contains = |b: &[u8], needle: &[u8]| b.windows(needle.len()).any(|w| w == needle);
    assert!(contains(&original, b"http://ns.adobe.com/xap/1.0/"));
    assert!(contains(&original, b"Photoshop 3.0"));
    let s = setup_with(INLINE, "strip_metadata = true").await;
    for (how, url) in both_ways(&s, name, "image/jpeg") {
        assert_eq!(send_b(&s, &url).await.0, 200, "{how}");
        let sent = s.inlined(1).1;
        assert!(
            !contains(&sent, b"http://ns.adobe.com/xap/1.0/"),
            "{how}: XMP"
        );
        assert!(!contains(&sent, b"Photoshop 3.0"), "{how}: IPTC");
        assert!(!has_gps_or_exif(&sent), "{how}: EXIF");
        let decoded = |b: &[u8]| image::load_from_memory(b).expect("decodes").to_rgb8();
        assert_eq!(decoded(&sent), decoded(&original), "{how}: same pixels");
    }
}
