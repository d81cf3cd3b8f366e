//! Vision requests made portable, through the real server: image URLs
//! fetched safely from a real image host on 127.0.0.2 and inlined, formats
//! converted, `detail` carried out and stripped, sizes fitted, data URIs
//! validated, the fetch limits, the cache, and refusals.
//!
//! Every address these tests send traffic to is loopback. Refusals of
//! non-loopback addresses run inside a network namespace with only loopback
//! (see `refusals_in_a_loopback_only_network_namespace`), so not even wrong
//! code could reach them.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

mod support;

use std::io::Cursor;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use image::{DynamicImage, ImageFormat, Rgb, RgbImage};
use serde_json::{Value, json};
use support::image_server::{ImageServer, raw_server};
use support::{Iris, KEY_A, MockUpstream, base_config, http};

const IMAGE_HOST: &str = "127.0.0.2";
const INLINE: &str = "inline_images = true";
const ALLOW_HOST: &str = r#"allowed_networks = ["127.0.0.2/32"]"#;
const WEB_FORMATS: &str = r#"image_formats = ["jpeg", "png", "webp"]"#;

// --- images ---------------------------------------------------------------

/// Many colours, like a photo: conversions pick JPEG for it.
fn photo(w: u32, h: u32) -> DynamicImage {
    DynamicImage::ImageRgb8(RgbImage::from_fn(w, h, |x, y| {
        let noise = (x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503)) % 31;
        Rgb([
            ((x * 255 / w) as u8).wrapping_add(noise as u8),
            ((y * 255 / h) as u8).wrapping_add(noise as u8),
            ((x + y) % 256) as u8,
        ])
    }))
}

/// Two colours in stripes, like a chart: conversions pick PNG for it.
fn chart(w: u32, h: u32) -> DynamicImage {
    DynamicImage::ImageRgb8(RgbImage::from_fn(w, h, |x, _| {
        if x % 16 < 8 {
            Rgb([200, 30, 30])
        } else {
            Rgb([250, 250, 250])
        }
    }))
}

fn encode(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, format).expect("encode");
    out.into_inner()
}

fn dims(bytes: &[u8]) -> (u32, u32) {
    let image = image::load_from_memory(bytes).expect("a decodable image");
    (image.width(), image.height())
}

// --- the gateway ------------------------------------------------------------

struct Setup {
    upstream: MockUpstream,
    host: ImageServer,
    iris: Iris,
}

/// Iris with `upstream_keys` added to its upstream and `images` as its
/// `[images]` table, the mock upstream, and an image host on 127.0.0.2.
async fn setup(upstream_keys: &str, images: &str) -> Setup {
    let upstream = MockUpstream::start().await;
    let host = ImageServer::start(IMAGE_HOST).await;
    let iris = Iris::start(&config(&upstream.base_url(), upstream_keys, images)).await;
    Setup {
        upstream,
        host,
        iris,
    }
}

fn config(upstream: &str, upstream_keys: &str, images: &str) -> String {
    let config = base_config(upstream, &format!("\n[images]\n{images}\n"));
    assert!(config.contains("timeout_ms = 2000\n"));
    config.replacen(
        "timeout_ms = 2000\n",
        &format!("timeout_ms = 2000\n{upstream_keys}\n"),
        1,
    )
}

/// A chat body for `other-model` (not renamed upstream) with one user
/// message: a text part, then one image part per `(url, detail)`.
fn body_with_images(images: &[(&str, Option<&str>)]) -> Value {
    let mut content = vec![json!({"type": "text", "text": "What is in these images?"})];
    for (url, detail) in images {
        let mut image_url = json!({"url": url});
        if let Some(detail) = detail {
            image_url["detail"] = json!(detail);
        }
        content.push(json!({"type": "image_url", "image_url": image_url}));
    }
    json!({"model": "other-model", "messages": [{"role": "user", "content": content}]})
}

async fn send(iris: &Iris, body: &Value) -> (u16, Value) {
    let response = http()
        .post(iris.url("/v1/chat/completions"))
        .bearer_auth(KEY_A)
        .json(body)
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.expect("JSON"))
}

/// Sends `body` and expects a 400 with `code` and `param`; returns the message.
async fn refused(iris: &Iris, body: &Value, code: &str, param: &str) -> String {
    let (status, answer) = send(iris, body).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["code"], code, "{answer}");
    assert_eq!(answer["error"]["param"], param, "{answer}");
    assert_eq!(answer["error"]["type"], "invalid_request_error");
    answer["error"]["message"]
        .as_str()
        .expect("message")
        .to_owned()
}

/// The image URL the upstream received at `messages[0].content[part]`.
fn sent_image(upstream: &MockUpstream, part: usize) -> Value {
    upstream.last().json()["messages"][0]["content"][part]["image_url"].clone()
}

/// A data URI's MIME type and bytes.
fn data_uri(value: &Value) -> (String, Vec<u8>) {
    let uri = value.as_str().expect("a string URL");
    let rest = uri.strip_prefix("data:").expect("a data URI");
    let (mime, payload) = rest.split_once(";base64,").expect("base64");
    (
        mime.to_owned(),
        BASE64.decode(payload).expect("valid base64"),
    )
}

const PARAM: &str = "messages[0].content[1].image_url.url";

// --- inlining and formats ------------------------------------------------------

#[tokio::test]
async fn inlines_accepted_formats_byte_for_byte_with_the_type_from_the_bytes() {
    let s = setup(INLINE, ALLOW_HOST).await;
    let jpeg = encode(&photo(64, 48), ImageFormat::Jpeg);
    let png = encode(&chart(40, 30), ImageFormat::Png);
    let webp = encode(&photo(20, 10), ImageFormat::WebP);
    // Every server header and file name lies; only the bytes tell.
    s.host
        .add("photo.gif", "application/octet-stream", jpeg.clone());
    s.host.add("chart.jpg", "image/jpeg", png.clone());
    s.host.add("small.png", "image/png", webp.clone());
    let body = body_with_images(&[
        (&s.host.url("/files/photo.gif"), None),
        (&s.host.url("/files/chart.jpg"), None),
        (&s.host.url("/files/small.png"), None),
    ]);
    let (status, answer) = send(&s.iris, &body).await;
    assert_eq!(status, 200, "{answer}");

    for (part, mime, bytes) in [
        (1, "image/jpeg", &jpeg),
        (2, "image/png", &png),
        (3, "image/webp", &webp),
    ] {
        let sent = sent_image(&s.upstream, part);
        let (got_mime, got) = data_uri(&sent["url"]);
        assert_eq!(got_mime, mime);
        assert!(&got == bytes, "part {part}: the fetched bytes, exactly");
    }
    // The rest of the request is as the client sent it.
    let received = s.upstream.last().json();
    assert_eq!(
        received["messages"][0]["content"][0],
        body["messages"][0]["content"][0]
    );
    assert_eq!(received["model"], "other-model");

    for seen in s.host.seen() {
        assert_eq!(seen.headers["accept-encoding"], "identity");
        assert!(seen.headers.get("referer").is_none());
    }
}

#[tokio::test]
async fn unaccepted_formats_are_converted_keeping_their_dimensions() {
    let s = setup(&format!("{INLINE}\n{WEB_FORMATS}"), ALLOW_HOST).await;
    s.host.add(
        "chart.gif",
        "image/gif",
        encode(&chart(120, 80), ImageFormat::Gif),
    );
    s.host.add(
        "photo.bmp",
        "image/bmp",
        encode(&photo(200, 150), ImageFormat::Bmp),
    );
    s.host.add(
        "photo.tiff",
        "image/tiff",
        encode(&photo(90, 60), ImageFormat::Tiff),
    );
    let body = body_with_images(&[
        (&s.host.url("/files/chart.gif"), None),
        (&s.host.url("/files/photo.bmp"), None),
        (&s.host.url("/files/photo.tiff"), None),
    ]);
    let (status, answer) = send(&s.iris, &body).await;
    assert_eq!(status, 200, "{answer}");
    for (part, mime, size) in [
        (1, "image/png", (120, 80)),
        (2, "image/jpeg", (200, 150)),
        (3, "image/jpeg", (90, 60)),
    ] {
        let (got_mime, bytes) = data_uri(&sent_image(&s.upstream, part)["url"]);
        assert_eq!(got_mime, mime, "part {part}");
        assert_eq!(dims(&bytes), size, "part {part}: same pixel dimensions");
    }
}

#[tokio::test]
async fn what_is_not_an_image_is_refused_whatever_its_content_type() {
    let s = setup(INLINE, ALLOW_HOST).await;
    s.host.add(
        "page.png",
        "image/png",
        &b"<!doctype html><html>not an image</html>"[..],
    );
    let mut truncated = encode(&chart(10, 10), ImageFormat::Png);
    truncated.truncate(12);
    s.host.add("truncated.png", "image/png", truncated);
    for name in ["page.png", "truncated.png"] {
        let body = body_with_images(&[(&s.host.url(&format!("/files/{name}")), None)]);
        refused(&s.iris, &body, "image_format_unsupported", PARAM).await;
    }
    assert!(s.upstream.received().is_empty());
}

#[tokio::test]
async fn upstreams_that_fetch_for_themselves_get_urls_untouched() {
    let s = setup("inline_images = false", ALLOW_HOST).await;
    let url = s.host.url("/files/anything.png?sig=abc&x=1");
    let raw = serde_json::to_vec(&body_with_images(&[(&url, Some("low"))])).expect("json");
    let response = http()
        .post(s.iris.url("/v1/chat/completions"))
        .bearer_auth(KEY_A)
        .header("content-type", "application/json")
        .body(raw.clone())
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    assert_eq!(
        s.upstream.last().body,
        raw,
        "the body goes upstream byte for byte"
    );
    assert_eq!(s.host.seen().len(), 0, "Iris fetched nothing");
}

// --- detail ----------------------------------------------------------------------

#[tokio::test]
async fn low_detail_is_carried_out_before_the_field_is_stripped() {
    let s = setup(&format!("{INLINE}\nstrip_detail = true"), ALLOW_HOST).await;
    let wide = encode(&chart(2000, 1000), ImageFormat::Png);
    s.host.add("wide.png", "image/png", wide.clone());
    let url = s.host.url("/files/wide.png");
    let body = body_with_images(&[(&url, Some("low")), (&url, Some("high")), (&url, None)]);
    let (status, answer) = send(&s.iris, &body).await;
    assert_eq!(status, 200, "{answer}");

    let low = sent_image(&s.upstream, 1);
    assert!(low.get("detail").is_none(), "{low}");
    let (mime, bytes) = data_uri(&low["url"]);
    assert_eq!(mime, "image/png");
    assert_eq!(
        dims(&bytes),
        (512, 256),
        "at most 512 px a side, aspect kept"
    );

    for part in [2, 3] {
        let sent = sent_image(&s.upstream, part);
        assert!(sent.get("detail").is_none(), "{sent}");
        assert!(
            data_uri(&sent["url"]).1 == wide,
            "high and auto keep every byte"
        );
    }
    assert_eq!(
        s.host.hits("/files/wide.png"),
        1,
        "one fetch for three uses"
    );
}

#[tokio::test]
async fn detail_is_left_alone_where_the_upstream_takes_it() {
    let s = setup(INLINE, ALLOW_HOST).await;
    let wide = encode(&chart(2000, 1000), ImageFormat::Png);
    s.host.add("wide.png", "image/png", wide.clone());
    let body = body_with_images(&[(&s.host.url("/files/wide.png"), Some("low"))]);
    let (status, answer) = send(&s.iris, &body).await;
    assert_eq!(status, 200, "{answer}");
    let sent = sent_image(&s.upstream, 1);
    assert_eq!(sent["detail"], "low");
    assert!(data_uri(&sent["url"]).1 == wide);
}

// --- size ----------------------------------------------------------------------------

#[tokio::test]
async fn max_image_bytes_makes_larger_images_fit() {
    let s = setup(
        &format!("{INLINE}\n{WEB_FORMATS}\nmax_image_bytes = 150000"),
        ALLOW_HOST,
    )
    .await;
    let big = encode(&photo(1200, 900), ImageFormat::Png);
    assert!(big.len() > 1_000_000, "{}", big.len());
    let small = encode(&photo(50, 50), ImageFormat::Jpeg);
    s.host.add("big.png", "image/png", big);
    s.host.add("small.jpg", "image/jpeg", small.clone());
    let body = body_with_images(&[
        (&s.host.url("/files/big.png"), None),
        (&s.host.url("/files/small.jpg"), None),
    ]);
    let (status, answer) = send(&s.iris, &body).await;
    assert_eq!(status, 200, "{answer}");
    let (_, fitted) = data_uri(&sent_image(&s.upstream, 1)["url"]);
    assert!(fitted.len() <= 150_000, "{}", fitted.len());
    let (w, h) = dims(&fitted);
    assert!(w <= 1200 && h <= 900);
    assert!(
        data_uri(&sent_image(&s.upstream, 2)["url"]).1 == small,
        "under the limit: untouched"
    );
}

// --- data URIs ----------------------------------------------------------------------------

#[tokio::test]
async fn client_data_uris_are_validated_and_converted_like_fetched_images() {
    // No inlining: data URIs are still the gateway's to check.
    let s = setup(
        &format!("inline_images = false\n{WEB_FORMATS}"),
        "max_bytes = 200000",
    )
    .await;
    let png = encode(&chart(30, 20), ImageFormat::Png);
    let good = format!("data:image/png;base64,{}", BASE64.encode(&png));
    let raw = serde_json::to_vec(&body_with_images(&[(&good, None)])).expect("json");
    let response = http()
        .post(s.iris.url("/v1/chat/completions"))
        .bearer_auth(KEY_A)
        .header("content-type", "application/json")
        .body(raw.clone())
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    assert_eq!(s.upstream.last().body, raw, "a valid data URI goes as sent");

    // A GIF the upstream does not take becomes a PNG of the same size.
    let gif = format!(
        "data:image/gif;base64,{}",
        BASE64.encode(encode(&chart(30, 20), ImageFormat::Gif))
    );
    let (status, answer) = send(&s.iris, &body_with_images(&[(&gif, None)])).await;
    assert_eq!(status, 200, "{answer}");
    let (mime, bytes) = data_uri(&sent_image(&s.upstream, 1)["url"]);
    assert_eq!(mime, "image/png");
    assert_eq!(dims(&bytes), (30, 20));

    // A declared type that lies is corrected; the bytes stay.
    let lying = format!("data:image/webp;base64,{}", BASE64.encode(&png));
    let (status, _) = send(&s.iris, &body_with_images(&[(&lying, None)])).await;
    assert_eq!(status, 200);
    assert_eq!(sent_image(&s.upstream, 1)["url"], good);

    for (uri, code) in [
        (
            "data:image/png;base64,iVBOR*w0KGgo!".to_owned(),
            "invalid_image_data",
        ),
        ("data:image/png,rawbytes".to_owned(), "invalid_image_data"),
        ("data:image/png;base64,".to_owned(), "invalid_image_data"),
        (
            format!(
                "data:image/png;base64,{}",
                BASE64.encode(b"GIF? no, plain text")
            ),
            "image_format_unsupported",
        ),
        (
            format!(
                "data:image/png;base64,{}",
                BASE64.encode(vec![0u8; 300_000])
            ),
            "image_too_large",
        ),
    ] {
        refused(&s.iris, &body_with_images(&[(&uri, None)]), code, PARAM).await;
    }
}

// --- many images ---------------------------------------------------------------------

#[tokio::test]
async fn too_many_images_are_refused_before_any_fetch() {
    let s = setup(INLINE, &format!("{ALLOW_HOST}\nmax_images_per_request = 2")).await;
    s.host
        .add("a.png", "image/png", encode(&chart(8, 8), ImageFormat::Png));
    let url = s.host.url("/files/a.png");
    let body = body_with_images(&[(&url, None), (&url, None), (&url, None)]);
    let message = refused(
        &s.iris,
        &body,
        "too_many_images",
        "messages[0].content[3].image_url.url",
    )
    .await;
    assert!(message.contains("at most 2"), "{message}");
    assert!(s.host.seen().is_empty(), "no fetch started");

    let (status, _) = send(&s.iris, &body_with_images(&[(&url, None), (&url, None)])).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_failing_image_fails_the_request_naming_that_image() {
    let s = setup(INLINE, ALLOW_HOST).await;
    s.host.add(
        "ok.png",
        "image/png",
        encode(&chart(8, 8), ImageFormat::Png),
    );
    let ok = s.host.url("/files/ok.png");
    let missing = s.host.url("/files/missing.png");
    let body = json!({"model": "other-model", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": ok}}]},
        {"role": "user", "content": [
            {"type": "text", "text": "and this one?"},
            {"type": "image_url", "image_url": {"url": missing}},
            {"type": "image_url", "image_url": {"url": ok}},
        ]},
    ]});
    let message = refused(
        &s.iris,
        &body,
        "image_fetch_failed",
        "messages[2].content[1].image_url.url",
    )
    .await;
    assert!(message.contains("404"), "{message}");
    assert!(s.upstream.received().is_empty());
}

#[tokio::test]
async fn images_of_one_request_are_fetched_concurrently_with_a_bound() {
    let s = setup(
        INLINE,
        &format!("{ALLOW_HOST}\nmax_images_per_request = 16"),
    )
    .await;
    s.host
        .add("a.png", "image/png", encode(&chart(8, 8), ImageFormat::Png));
    let urls: Vec<String> = (0..12)
        .map(|i| s.host.url(&format!("/files/a.png?delay_ms=300&n={i}")))
        .collect();
    let images: Vec<(&str, Option<&str>)> = urls.iter().map(|u| (u.as_str(), None)).collect();
    let started = Instant::now();
    let (status, answer) = send(&s.iris, &body_with_images(&images)).await;
    let elapsed = started.elapsed();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(s.host.seen().len(), 12);
    // Twelve 300 ms fetches, at most eight at once: two rounds, not twelve.
    assert!(elapsed < Duration::from_millis(2000), "{elapsed:?}");
    assert!(s.host.peak() > 1, "fetched concurrently");
    assert!(
        s.host.peak() <= 8,
        "at most 8 at once, saw {}",
        s.host.peak()
    );
}

// --- cache ---------------------------------------------------------------------------

#[tokio::test]
async fn the_cache_serves_repeats_and_fetches_a_url_once_for_concurrent_requests() {
    let s = setup(INLINE, ALLOW_HOST).await;
    let png = encode(&chart(16, 16), ImageFormat::Png);
    s.host.add("a.png", "image/png", png.clone());
    let url = s.host.url("/files/a.png?delay_ms=300");
    let body = body_with_images(&[(&url, None)]);
    let requests = (0..5).map(|_| send(&s.iris, &body));
    for (status, answer) in futures_util::future::join_all(requests).await {
        assert_eq!(status, 200, "{answer}");
    }
    assert_eq!(s.host.hits("/files/a.png"), 1, "single flight");
    let (status, _) = send(&s.iris, &body).await;
    assert_eq!(status, 200);
    assert_eq!(s.host.hits("/files/a.png"), 1, "served from the cache");
    assert!(data_uri(&sent_image(&s.upstream, 1)["url"]).1 == png);
}

#[tokio::test]
async fn with_cache_bytes_zero_every_request_fetches() {
    let s = setup(INLINE, &format!("{ALLOW_HOST}\ncache_bytes = 0")).await;
    s.host.add(
        "a.png",
        "image/png",
        encode(&chart(16, 16), ImageFormat::Png),
    );
    let body = body_with_images(&[(&s.host.url("/files/a.png"), None)]);
    for _ in 0..2 {
        assert_eq!(send(&s.iris, &body).await.0, 200);
    }
    assert_eq!(s.host.hits("/files/a.png"), 2);
}

// --- refusals on loopback (safe to run anywhere) ----------------------------------------

#[tokio::test]
async fn loopback_is_refused_unless_allowed_in_every_notation() {
    let s = setup(INLINE, ALLOW_HOST).await;
    // An image host on 127.0.0.1, which is not in allowed_networks.
    let other = ImageServer::start("127.0.0.1").await;
    other.add("a.png", "image/png", encode(&chart(8, 8), ImageFormat::Png));
    let port = other.addr.port();
    for url in [
        format!("http://127.0.0.1:{port}/files/a.png"),
        format!("http://127.1:{port}/files/a.png"),
        format!("http://0x7f.0.0.1:{port}/files/a.png"),
        format!("http://0x7f000001:{port}/files/a.png"),
        format!("http://2130706433:{port}/files/a.png"),
        format!("http://0177.0.0.1:{port}/files/a.png"),
        format!("http://[::ffff:127.0.0.1]:{port}/files/a.png"),
        format!("http://[::ffff:7f00:1]:{port}/files/a.png"),
        // A name: refused by the resolver, not by a literal check.
        format!("http://localhost:{port}/files/a.png"),
    ] {
        let message = refused(
            &s.iris,
            &body_with_images(&[(&url, None)]),
            "image_url_forbidden",
            PARAM,
        )
        .await;
        assert!(message.contains("loopback"), "{url}: {message}");
    }
    assert!(other.seen().is_empty(), "the refused host saw no request");
    assert!(s.upstream.received().is_empty());
}

#[tokio::test]
async fn allowed_networks_let_a_name_through_the_resolver() {
    let s = setup(INLINE, r#"allowed_networks = ["127.0.0.0/8", "::1/128"]"#).await;
    let local = ImageServer::start("127.0.0.1").await;
    let png = encode(&chart(8, 8), ImageFormat::Png);
    local.add("a.png", "image/png", png.clone());
    let url = format!("http://localhost:{}/files/a.png", local.addr.port());
    let (status, answer) = send(&s.iris, &body_with_images(&[(&url, None)])).await;
    assert_eq!(status, 200, "{answer}");
    assert!(data_uri(&sent_image(&s.upstream, 1)["url"]).1 == png);
    drop(s.host);
}

#[tokio::test]
async fn schemes_other_than_http_and_userinfo_are_refused() {
    let s = setup(INLINE, ALLOW_HOST).await;
    s.host
        .add("a.png", "image/png", encode(&chart(8, 8), ImageFormat::Png));
    let with_credentials = s
        .host
        .url("/files/a.png")
        .replace("http://", "http://user:hunter2@");
    for url in [
        "ftp://127.0.0.2/a.png".to_owned(),
        "file:///etc/passwd".to_owned(),
        "gopher://127.0.0.2/".to_owned(),
        "not a url".to_owned(),
        "/relative/a.png".to_owned(),
        with_credentials,
    ] {
        let message = refused(
            &s.iris,
            &body_with_images(&[(&url, None)]),
            "image_url_forbidden",
            PARAM,
        )
        .await;
        assert!(!message.contains("hunter2"), "{message}");
    }
    assert!(s.host.seen().is_empty());
}

#[tokio::test]
async fn errors_never_echo_paths_or_query_strings() {
    let s = setup(INLINE, ALLOW_HOST).await;
    for (url, code) in [
        (
            s.host
                .url("/status/403?X-Amz-Signature=SECRET-SIG&token=SECRET-TOKEN"),
            "image_fetch_failed",
        ),
        (
            "http://127.0.0.1:9/secret-path/a.png?X-Amz-Signature=SECRET-SIG".to_owned(),
            "image_url_forbidden",
        ),
    ] {
        let message = refused(&s.iris, &body_with_images(&[(&url, None)]), code, PARAM).await;
        assert!(
            !message.contains("SECRET") && !message.contains("secret-path"),
            "{message}"
        );
    }
}

// --- redirects ---------------------------------------------------------------------------

#[tokio::test]
async fn redirects_are_followed_counted_and_checked_at_every_hop() {
    let s = setup(INLINE, &format!("{ALLOW_HOST}\nmax_redirects = 3")).await;
    let png = encode(&chart(8, 8), ImageFormat::Png);
    s.host.add("a.png", "image/png", png.clone());

    let (status, answer) = send(
        &s.iris,
        &body_with_images(&[(&s.host.url("/chain/3/a.png"), None)]),
    )
    .await;
    assert_eq!(status, 200, "three redirects are allowed: {answer}");
    assert!(data_uri(&sent_image(&s.upstream, 1)["url"]).1 == png);

    for path in ["/chain/4/a.png", "/loop"] {
        let message = refused(
            &s.iris,
            &body_with_images(&[(&s.host.url(path), None)]),
            "image_fetch_failed",
            PARAM,
        )
        .await;
        assert!(
            message.contains("more than 3 redirects"),
            "{path}: {message}"
        );
    }
    assert_eq!(
        s.host.hits("/loop"),
        4,
        "the original request and three hops"
    );

    // Hops to a refused address, scheme or userinfo.
    let (refused_host, connections) = raw_server(
        "127.0.0.1",
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_vec(),
        false,
    )
    .await;
    let hop = s.host.addr.to_string();
    for (target, named) in [
        (
            format!("http://{refused_host}/a.png"),
            format!("http://{refused_host}"),
        ),
        (
            format!("http://localhost:{}/a.png", refused_host.port()),
            "localhost".to_owned(),
        ),
        (
            "ftp://127.0.0.2/a.png".to_owned(),
            "ftp://127.0.0.2".to_owned(),
        ),
        (
            s.host.url("/files/a.png").replace("http://", "http://u:p@"),
            format!("http://{hop}"),
        ),
    ] {
        let url = s.host.url(&format!("/redirect?to={}", urlencode(&target)));
        let message = refused(
            &s.iris,
            &body_with_images(&[(&url, None)]),
            "image_url_forbidden",
            PARAM,
        )
        .await;
        // The refused target is named; the hop before it (the image host)
        // only where it is the target itself (the userinfo case).
        assert!(
            message.contains(&format!("redirects to {named}")),
            "{target}: {message}"
        );
        if !named.contains(&hop) {
            assert!(!message.contains(&hop), "{target}: {message}");
        }
    }
    assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 0);
}

/// A `Location` that is not http(s), or is not a URL at all, is refused as
/// `image_url_forbidden`, and the message names that target (its origin, or
/// its scheme alone), never its path or query, and not the hop before it.
#[tokio::test]
async fn redirects_to_other_schemes_or_unparseable_locations_are_refused() {
    let s = setup(INLINE, &format!("{ALLOW_HOST}\nmax_redirects = 3")).await;
    let png = encode(&chart(8, 8), ImageFormat::Png);
    s.host.add("a.png", "image/png", png.clone());
    // A host that counts connections, to show nothing is dialled.
    let (listener, connections) = raw_server(
        "127.0.0.1",
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_vec(),
        false,
    )
    .await;
    let port = listener.port();
    let hop = s.host.addr.to_string();
    for (location, named) in [
        // Schemes the HTTP stack can hold: refused by the redirect policy.
        (
            "gopher://127.0.0.2:70/_SECRET-PATH?q=SECRET".to_owned(),
            "gopher://127.0.0.2:70".to_owned(),
        ),
        (
            "ftp://127.0.0.2/SECRET.png".to_owned(),
            "ftp://127.0.0.2".to_owned(),
        ),
        (
            format!("dict://127.0.0.1:{port}/SECRET"),
            format!("dict://127.0.0.1:{port}"),
        ),
        (
            format!("ldap://127.0.0.1:{port}/dc=SECRET"),
            format!("ldap://127.0.0.1:{port}"),
        ),
        (
            "ws://127.0.0.2/SECRET".to_owned(),
            "ws://127.0.0.2".to_owned(),
        ),
        // Schemes it cannot: handed back unfollowed, refused after.
        ("file:///etc/passwd?SECRET".to_owned(), "file:".to_owned()),
        (
            "file://fileserver/SECRET/share".to_owned(),
            "file://fileserver".to_owned(),
        ),
        (
            "data:image/png;base64,iVBORw0KGgoSECRET".to_owned(),
            "data:".to_owned(),
        ),
        (
            "javascript:alert('SECRET')".to_owned(),
            "javascript:".to_owned(),
        ),
        ("mailto:SECRET@example.com".to_owned(), "mailto:".to_owned()),
        // Not URLs: the scheme alone, or nothing, is named.
        ("http://[::1/SECRET".to_owned(), "http:".to_owned()),
        ("http://999.1.1.1/SECRET".to_owned(), "http:".to_owned()),
        (
            "https://exa mple.com/SECRET".to_owned(),
            "https:".to_owned(),
        ),
        ("https://%00/SECRET".to_owned(), "https:".to_owned()),
        ("//[::1/SECRET".to_owned(), "a Location".to_owned()),
    ] {
        for status in [301, 302, 303, 307, 308, 300] {
            let url = s.host.url(&format!(
                "/redirect?status={status}&to={}",
                urlencode(&location)
            ));
            let message = refused(
                &s.iris,
                &body_with_images(&[(&url, None)]),
                "image_url_forbidden",
                PARAM,
            )
            .await;
            assert!(
                message.starts_with(&format!(
                    "The image URL redirects to {named}, which is refused: "
                )),
                "{status} {location}: {message}"
            );
            assert!(
                !message.contains("SECRET"),
                "{status} {location}: {message}"
            );
            assert!(!message.contains(&hop), "{status} {location}: {message}");
        }
    }

    // Two hops on: the refused third names the third, not the second.
    let inner = format!("/redirect?to={}", urlencode("file:///etc/passwd"));
    let url = s.host.url(&format!("/redirect?to={}", urlencode(&inner)));
    let message = refused(
        &s.iris,
        &body_with_images(&[(&url, None)]),
        "image_url_forbidden",
        PARAM,
    )
    .await;
    assert!(
        message
            .starts_with("The image URL redirects to file:, which is refused: the scheme \"file\""),
        "{message}"
    );

    // A Location that is not UTF-8, from a second host one hop on.
    let (raw, _) = raw_server(
        IMAGE_HOST,
        b"HTTP/1.1 302 Found\r\nlocation: http://\xff\xfe/SECRET\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_vec(),
        false,
    )
    .await;
    let url = s.host.url(&format!(
        "/redirect?to={}",
        urlencode(&format!("http://{raw}/"))
    ));
    let message = refused(
        &s.iris,
        &body_with_images(&[(&url, None)]),
        "image_url_forbidden",
        PARAM,
    )
    .await;
    assert_eq!(
        message,
        "The image URL redirects to http:, which is refused: it cannot be parsed as a URL."
    );

    // Control: 300 towards an allowed URL is a status failure, and a 302
    // towards one is followed.
    let to_png = urlencode(&s.host.url("/files/a.png"));
    let url = s.host.url(&format!("/redirect?status=300&to={to_png}"));
    refused(
        &s.iris,
        &body_with_images(&[(&url, None)]),
        "image_fetch_failed",
        PARAM,
    )
    .await;
    let url = s.host.url(&format!("/redirect?status=302&to={to_png}"));
    let (status, answer) = send(&s.iris, &body_with_images(&[(&url, None)])).await;
    assert_eq!(status, 200, "{answer}");
    assert!(data_uri(&sent_image(&s.upstream, 1)["url"]).1 == png);

    assert_eq!(
        connections.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "nothing dialled"
    );
    assert_eq!(
        s.upstream.received().len(),
        1,
        "only the control reached the upstream"
    );
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

// --- limits while reading -------------------------------------------------------------------

#[tokio::test]
async fn one_deadline_covers_the_whole_fetch_redirects_included() {
    let s = setup(INLINE, &format!("{ALLOW_HOST}\nfetch_timeout_ms = 1000")).await;
    let png = encode(&photo(200, 200), ImageFormat::Png);
    s.host.add("a.png", "image/png", png.clone());

    // Three hops of 400 ms: each within the deadline, together not.
    let started = Instant::now();
    let message = refused(
        &s.iris,
        &body_with_images(&[(&s.host.url("/chain/3/a.png?delay_ms=400"), None)]),
        "image_fetch_failed",
        PARAM,
    )
    .await;
    assert!(message.contains("longer than 1000 ms"), "{message}");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );

    // A body that trickles in for seconds.
    assert!(png.len() > 20 * 1024);
    let started = Instant::now();
    refused(
        &s.iris,
        &body_with_images(&[(&s.host.url("/slow/a.png?chunk_ms=100"), None)]),
        "image_fetch_failed",
        PARAM,
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn the_byte_cap_holds_whatever_content_length_says() {
    let s = setup(INLINE, &format!("{ALLOW_HOST}\nmax_bytes = 100000")).await;
    // No Content-Length: chunked.
    refused(
        &s.iris,
        &body_with_images(&[(&s.host.url("/chunked/1000000"), None)]),
        "image_too_large",
        PARAM,
    )
    .await;
    // No Content-Length and no chunking: the body runs to the connection's end.
    let mut until_close =
        b"HTTP/1.1 200 OK\r\ncontent-type: image/png\r\nconnection: close\r\n\r\n\x89PNG\r\n\x1a\n"
            .to_vec();
    until_close.resize(until_close.len() + 1_000_000, 0);
    let (addr, _) = raw_server(IMAGE_HOST, until_close, false).await;
    refused(
        &s.iris,
        &body_with_images(&[(&format!("http://{addr}/a.png"), None)]),
        "image_too_large",
        PARAM,
    )
    .await;
    // A declared length over the cap is refused at once, before a body that never comes.
    let (addr, _) = raw_server(
        IMAGE_HOST,
        b"HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: 50000000\r\n\r\n\x89PNG"
            .to_vec(),
        true,
    )
    .await;
    let started = Instant::now();
    refused(
        &s.iris,
        &body_with_images(&[(&format!("http://{addr}/a.png"), None)]),
        "image_too_large",
        PARAM,
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(2));
    // A length that understates the body: only the declared bytes are read.
    let png = encode(&chart(8, 8), ImageFormat::Png);
    let mut understated = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: {}\r\n\r\n",
        png.len()
    )
    .into_bytes();
    understated.extend_from_slice(&png);
    understated.resize(understated.len() + 1_000_000, 0);
    let (addr, _) = raw_server(IMAGE_HOST, understated, false).await;
    let (status, answer) = send(
        &s.iris,
        &body_with_images(&[(&format!("http://{addr}/a.png"), None)]),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert!(data_uri(&sent_image(&s.upstream, 1)["url"]).1 == png);
    // An image of exactly the cap is fine.
    let mut exact = encode(&chart(8, 8), ImageFormat::Png);
    exact.resize(100_000, 0);
    s.host.add("exact.png", "image/png", exact.clone());
    let (status, answer) = send(
        &s.iris,
        &body_with_images(&[(&s.host.url("/files/exact.png"), None)]),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert!(data_uri(&sent_image(&s.upstream, 1)["url"]).1 == exact);
}

#[tokio::test]
async fn compressed_bodies_are_refused_not_inflated() {
    let s = setup(INLINE, ALLOW_HOST).await;
    s.host
        .add("a.png", "image/png", encode(&chart(8, 8), ImageFormat::Png));
    let message = refused(
        &s.iris,
        &body_with_images(&[(&s.host.url("/gzip/a.png"), None)]),
        "image_fetch_failed",
        PARAM,
    )
    .await;
    assert!(message.contains("gzip"), "{message}");
}

#[tokio::test]
async fn the_pixel_cap_is_checked_from_the_header_before_decoding() {
    let s = setup(INLINE, &format!("{ALLOW_HOST}\nmax_pixels = 50000000")).await;
    // 19 bytes that claim 65535x65535 pixels: a decompression bomb's header.
    s.host.add(
        "bomb.gif",
        "image/gif",
        &b"GIF89a\xff\xff\xff\xff\x00\x00\x00;"[..],
    );
    // A real, small file with too many pixels: 8000x8000 of one colour.
    let huge = encode(
        &DynamicImage::ImageLuma8(image::GrayImage::new(8000, 8000)),
        ImageFormat::Png,
    );
    assert!(huge.len() < 500_000, "{}", huge.len());
    s.host.add("huge.png", "image/png", huge);
    for name in ["bomb.gif", "huge.png"] {
        let started = Instant::now();
        let message = refused(
            &s.iris,
            &body_with_images(&[(&s.host.url(&format!("/files/{name}")), None)]),
            "image_too_large",
            PARAM,
        )
        .await;
        assert!(message.contains("pixels"), "{message}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}

#[tokio::test]
async fn http_errors_and_dead_hosts_are_fetch_failures() {
    let s = setup(INLINE, ALLOW_HOST).await;
    for path in ["/status/500", "/status/404", "/files/nothing-here.png"] {
        refused(
            &s.iris,
            &body_with_images(&[(&s.host.url(path), None)]),
            "image_fetch_failed",
            PARAM,
        )
        .await;
    }
    // A port nobody listens on.
    let closed = std::net::TcpListener::bind((IMAGE_HOST, 0)).expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    refused(
        &s.iris,
        &body_with_images(&[(&format!("http://{IMAGE_HOST}:{port}/a.png"), None)]),
        "image_fetch_failed",
        PARAM,
    )
    .await;
}

// --- visibility --------------------------------------------------------------------------------

#[tokio::test]
async fn metrics_count_fetches_cache_conversions_and_refusals() {
    let s = setup(&format!("{INLINE}\n{WEB_FORMATS}"), ALLOW_HOST).await;
    s.host
        .add("a.gif", "image/gif", encode(&chart(8, 8), ImageFormat::Gif));
    let body = body_with_images(&[(&s.host.url("/files/a.gif"), None)]);
    assert_eq!(send(&s.iris, &body).await.0, 200);
    assert_eq!(send(&s.iris, &body).await.0, 200);
    let refused_body = body_with_images(&[("ftp://127.0.0.2/x.png", None)]);
    assert_eq!(send(&s.iris, &refused_body).await.0, 400);
    let metrics = http()
        .get(s.iris.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for expected in [
        "iris_image_fetches_total{result=\"ok\"}",
        "iris_image_fetched_bytes_total",
        "iris_image_fetch_duration_seconds",
        "iris_image_cache_total{layer=\"rendered\",outcome=\"hit\"}",
        "iris_image_conversions_total{from=\"gif\",to=\"png\",reason=\"format\"}",
        "iris_image_refusals_total{code=\"image_url_forbidden\",reason=\"scheme\"}",
    ] {
        assert!(
            metrics.contains(expected),
            "missing {expected} in:\n{metrics}"
        );
    }
    assert!(!metrics.contains("127.0.0.2"), "no URL in a metric");
}

// --- isolated processes: a loopback-only network, proxy variables ---------------------------------

/// Set in a re-executed copy of this test binary to say which inner check to run.
const INNER: &str = "IRIS_IMAGES_INNER_TEST";

/// Re-runs the single test `name` of this binary in a child process with
/// `envs`, inside a fresh network namespace (only loopback, brought up) when
/// `netns`. `None` when namespaces are unavailable here.
fn rerun(name: &str, netns: bool, envs: &[(&str, String)]) -> Option<std::process::Output> {
    let exe = std::env::current_exe().expect("test binary");
    let mut command = if netns {
        let probe = std::process::Command::new("unshare")
            .args(["-n", "true"])
            .output();
        if !probe.is_ok_and(|o| o.status.success()) {
            return None;
        }
        let mut command = std::process::Command::new("unshare");
        command
            .args([
                "-n",
                "--",
                "sh",
                "-c",
                "ip link set lo up && exec \"$0\" \"$@\"",
            ])
            .arg(exe);
        command
    } else {
        std::process::Command::new(exe)
    };
    command
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env_remove("NO_PROXY")
        .env_remove("no_proxy");
    for (key, value) in envs {
        command.env(key, value);
    }
    Some(command.output().expect("re-run the test binary"))
}

fn assert_child_passed(output: &std::process::Output, name: &str) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "inner {name} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn refusals_in_a_loopback_only_network_namespace() {
    const NAME: &str = "refusals_in_a_loopback_only_network_namespace";
    if std::env::var(INNER).as_deref() == Ok("netns") {
        return refusals_inside_the_namespace().await;
    }
    let Some(output) = rerun(NAME, true, &[(INNER, "netns".into())]) else {
        eprintln!(
            "SKIPPED {NAME}: cannot create a network namespace here (`unshare -n` needs root or user namespaces)"
        );
        return;
    };
    assert_child_passed(&output, NAME);
}

/// Runs only inside a namespace whose one interface is loopback: were the
/// policy wrong, these addresses would be unreachable, not reached.
async fn refusals_inside_the_namespace() {
    // Belt and braces: refuse to run with a route off this machine.
    let outside = tokio::time::timeout(
        Duration::from_millis(500),
        tokio::net::TcpStream::connect("10.0.0.1:80"),
    )
    .await;
    assert!(
        !matches!(outside, Ok(Ok(_))),
        "this namespace reaches beyond loopback"
    );

    let s = setup(INLINE, ALLOW_HOST).await;
    let secret = "?X-Amz-Signature=SECRET";
    for (target, reason) in [
        ("http://169.254.169.254/latest/meta-data/", "metadata"),
        ("http://[fd00:ec2::254]/latest/meta-data/", "metadata"),
        ("http://100.100.100.200/latest/meta-data/", "metadata"),
        ("http://0xa9fea9fe/", "metadata"),
        ("http://2852039166/", "metadata"),
        ("http://169.254.1.1/", "link-local"),
        ("http://[fe80::1]/", "link-local"),
        ("http://10.0.0.1/a.png", "private"),
        ("http://172.16.0.1/a.png", "private"),
        ("http://192.168.1.1/a.png", "private"),
        ("http://[fd12:3456::1]/a.png", "private"),
        ("http://100.64.0.1/a.png", "CGNAT"),
        ("http://0.0.0.0/a.png", "unspecified"),
        ("http://[::]/a.png", "unspecified"),
        ("http://224.0.0.1/a.png", "multicast"),
        ("http://[ff02::1]/a.png", "multicast"),
        ("http://255.255.255.255/a.png", "broadcast"),
        ("http://192.0.2.1/a.png", "documentation"),
        ("http://[2001:db8::1]/a.png", "documentation"),
        ("http://240.0.0.1/a.png", "reserved"),
        ("http://[::ffff:169.254.169.254]/", "metadata"),
        ("http://[::ffff:10.0.0.1]/", "private"),
        ("http://[::10.0.0.1]/", "private"),
        ("http://[64:ff9b::a9fe:a9fe]/", "metadata"),
        ("http://[64:ff9b::192.168.0.1]/", "private"),
        ("http://[2002:a9fe:a9fe::1]/", "metadata"),
        ("http://[2002:c0a8:0101::1]/", "private"),
        // Host agents and metadata outside 169.254.0.0/16, and their notations.
        (
            "http://168.63.129.16/machine?comp=goalstate",
            "Azure WireServer",
        ),
        ("http://2822734096/machine", "Azure WireServer"),
        ("http://0xa83f8110/machine", "Azure WireServer"),
        ("http://[::ffff:a83f:8110]/machine", "Azure WireServer"),
        ("http://169.254.170.2/v2/credentials/", "ECS"),
        ("http://169.254.170.23/v1/credentials", "Pod Identity"),
        ("http://[fd00:ec2::23]/v1/credentials", "Pod Identity"),
        ("http://[fd20:ce::254]/computeMetadata/v1/", "GCP"),
        ("http://192.0.0.192/latest/", "Oracle"),
        ("http://100.100.100.200./latest/", "Alibaba"),
        // By name, before any lookup.
        ("http://metadata.google.internal/computeMetadata/v1/", "GCP"),
        (
            "http://METADATA.google.internal./computeMetadata/v1/",
            "GCP",
        ),
        ("http://metadata/computeMetadata/v1/", "GCP"),
        ("http://instance-data/latest/meta-data/", "AWS"),
        (
            "https://kubernetes.default.svc/api",
            "Kubernetes API server",
        ),
        // Kubernetes service ranges, named.
        ("http://34.118.224.1/", "GKE"),
        ("http://10.96.0.1/", "Kubernetes"),
    ] {
        let url = format!("{target}{secret}");
        let message = refused(
            &s.iris,
            &body_with_images(&[(&url, None)]),
            "image_url_forbidden",
            PARAM,
        )
        .await;
        assert!(message.contains(reason), "{target}: {message}");
        assert!(!message.contains("SECRET"), "{message}");
    }

    // Redirects from the allowed host to refused addresses and names: the
    // message names the target, not the image host that redirected.
    let hop = s.host.addr.to_string();
    for (target, named) in [
        (
            "http://169.254.169.254/latest/meta-data/iam/",
            "http://169.254.169.254",
        ),
        ("http://10.0.0.1/a.png", "http://10.0.0.1"),
        ("http://[::ffff:a9fe:a9fe]/", "http://[::ffff:a9fe:a9fe]"),
        ("http://0xa9fea9fe/", "http://169.254.169.254"),
        (
            "http://168.63.129.16:32526/vmSettings",
            "http://168.63.129.16:32526",
        ),
        (
            "http://[fd00:ec2::254]/latest/api/token",
            "http://[fd00:ec2::254]",
        ),
        (
            "http://metadata.google.internal/computeMetadata/v1/",
            "http://metadata.google.internal",
        ),
    ] {
        let url = s.host.url(&format!("/redirect?to={}", urlencode(target)));
        let message = refused(
            &s.iris,
            &body_with_images(&[(&url, None)]),
            "image_url_forbidden",
            PARAM,
        )
        .await;
        assert!(
            message.starts_with(&format!(
                "The image URL redirects to {named}, which is refused: "
            )),
            "{target}: {message}"
        );
        assert!(!message.contains(&hop), "{target}: {message}");
    }
    assert!(s.upstream.received().is_empty());

    // Networks allowed around metadata endpoints open the networks, never
    // the endpoints: CGNAT without Alibaba's, link-local without IMDS,
    // 168.63/16 without the WireServer, fd00::/8 without AWS's IPv6 IMDS.
    let s = setup(
        INLINE,
        r#"allowed_networks = ["127.0.0.2/32", "100.64.0.0/10", "169.254.0.0/16", "168.63.0.0/16", "fd00::/8", "2002::/16"]"#,
    )
    .await;
    for target in [
        "http://100.100.100.200/latest/meta-data/",
        "http://169.254.169.254/latest/meta-data/",
        "http://169.254.170.2/v2/credentials/",
        "http://168.63.129.16/machine",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://[2002:a9fe:a9fe::1]/",
    ] {
        let message = refused(
            &s.iris,
            &body_with_images(&[(target, None)]),
            "image_url_forbidden",
            PARAM,
        )
        .await;
        assert!(message.contains("metadata"), "{target}: {message}");
    }
    // The rest of those networks is allowed: Iris tries to connect, and in
    // this namespace there is no route.
    for target in [
        "http://100.64.0.1/a.png",
        "http://169.254.1.1/a.png",
        "http://168.63.1.1/a.png",
    ] {
        refused(
            &s.iris,
            &body_with_images(&[(target, None)]),
            "image_fetch_failed",
            PARAM,
        )
        .await;
    }
}

#[tokio::test]
async fn proxy_environment_variables_are_ignored() {
    const NAME: &str = "proxy_environment_variables_are_ignored";
    if std::env::var(INNER).as_deref() == Ok("proxy") {
        return fetch_with_proxy_variables_set().await;
    }
    // A "proxy" that counts connections and answers each with a 502.
    let (proxy, connections) = raw_server(
        "127.0.0.1",
        b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_vec(),
        false,
    )
    .await;
    let proxy_url = format!("http://{proxy}");
    let envs: Vec<(&str, String)> = [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ]
    .into_iter()
    .map(|k| (k, proxy_url.clone()))
    .chain([(INNER, "proxy".to_owned())])
    .collect();
    let output = tokio::task::spawn_blocking(move || rerun(NAME, false, &envs))
        .await
        .expect("join")
        .expect("a child process");
    assert_child_passed(&output, NAME);
    assert_eq!(
        connections.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "only the control request went through the proxy"
    );
}

async fn fetch_with_proxy_variables_set() {
    let s = setup(INLINE, ALLOW_HOST).await;
    let png = encode(&chart(8, 8), ImageFormat::Png);
    s.host.add("a.png", "image/png", png.clone());
    let url = s.host.url("/files/a.png");

    // Control: a client that honours the variables does go to the proxy.
    let control = reqwest::Client::new()
        .get(&url)
        .send()
        .await
        .expect("via the proxy");
    assert_eq!(control.status(), 502, "the proxy variables are in effect");

    let (status, answer) = send(&s.iris, &body_with_images(&[(&url, None)])).await;
    assert_eq!(status, 200, "{answer}");
    assert!(data_uri(&sent_image(&s.upstream, 1)["url"]).1 == png);
    assert_eq!(s.host.hits("/files/a.png"), 1, "Iris fetched directly");
}
