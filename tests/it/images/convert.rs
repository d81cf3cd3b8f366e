//! What reaches the upstream: images inlined byte for byte or converted,
//! `detail` carried out and stripped, sizes fitted, client data URIs
//! validated.

use super::*;

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

/// Large images go upstream whole however they came: a fetched one (sent
/// from the image cache's data URI, not copied into the body) and a
/// client's own data URI (sent from the received body while the request
/// around it is rewritten), in a body whose `Content-Length` is its length.
#[tokio::test]
async fn large_images_reach_the_upstream_whole_fetched_or_sent_inline() {
    let s = setup(&format!("{INLINE}\nstrip_detail = true"), ALLOW_HOST).await;
    let fetched = encode(&photo(600, 400), ImageFormat::Jpeg);
    let inline = encode(&photo(300, 300), ImageFormat::Png);
    assert!(fetched.len() > 64 * 1024 && inline.len() > 64 * 1024);
    s.host.add("big.jpg", "image/jpeg", fetched.clone());
    let inline_uri = format!("data:image/png;base64,{}", BASE64.encode(&inline));
    let body = body_with_images(&[
        (&s.host.url("/files/big.jpg"), Some("high")),
        (&inline_uri, Some("high")),
    ]);
    let (status, answer) = send(&s.iris, &body).await;
    assert_eq!(status, 200, "{answer}");

    let received = s.upstream.last();
    assert_eq!(
        received.headers["content-length"],
        received.body.len().to_string()
    );
    let (mime, bytes) = s.inlined(1);
    assert_eq!(mime, "image/jpeg");
    assert!(bytes == fetched, "the fetched bytes, exactly");
    let sent = sent_image(&s.upstream, 2);
    assert!(
        sent["url"] == inline_uri.as_str(),
        "the client's URI, exactly"
    );
    for part in [1, 2] {
        assert!(sent_image(&s.upstream, part).get("detail").is_none());
    }
    let json = received.json();
    assert_eq!(
        json["messages"][0]["content"][0],
        body["messages"][0]["content"][0]
    );
    assert_eq!(json["model"], "other-model");
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
    let (_, fitted) = s.inlined(1);
    assert!(fitted.len() <= 150_000, "{}", fitted.len());
    let (w, h) = dims(&fitted);
    assert!(w <= 1200 && h <= 900);
    assert!(s.inlined(2).1 == small, "under the limit: untouched");
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
    let (status, answer) = s.send_one(&gif).await;
    assert_eq!(status, 200, "{answer}");
    let (mime, bytes) = s.inlined(1);
    assert_eq!(mime, "image/png");
    assert_eq!(dims(&bytes), (30, 20));

    // A declared type that lies is corrected; the bytes stay.
    let lying = format!("data:image/webp;base64,{}", BASE64.encode(&png));
    let (status, _) = s.send_one(&lying).await;
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
        s.refuse_one(&uri, code).await;
    }
}

// --- decoded once --------------------------------------------------------------

/// The samples of `iris_image_decodes_total` for `purpose` on `binary`.
async fn decodes(binary: &crate::support::binary::Binary, purpose: &str) -> f64 {
    let metrics = http()
        .get(binary.url("/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("text");
    crate::support::metric_sum(
        &metrics,
        "iris_image_decodes_total",
        &[&format!("purpose=\"{purpose}\"")],
    )
}

/// A fetched image is decoded once: a GIF the upstream does not take only
/// by its conversion (which proves its pixel data as the check would), a
/// PNG it takes only by its check, however many requests forward it. The
/// process is its own (a child), so its metrics count only this test's
/// images.
#[tokio::test]
async fn a_fetched_image_is_decoded_once_whether_converted_or_forwarded() {
    let upstream = MockUpstream::start().await;
    let host = ImageServer::start(IMAGE_HOST).await;
    host.add(
        "chart.gif",
        "image/gif",
        encode(&chart(120, 80), ImageFormat::Gif),
    );
    host.add(
        "chart.png",
        "image/png",
        encode(&chart(120, 80), ImageFormat::Png),
    );
    let binary = crate::support::binary::Binary::start(&config(
        &upstream.base_url(),
        &format!("{INLINE}\n{WEB_FORMATS}"),
        ALLOW_HOST,
    ))
    .await;
    let send_one = async |url: String| {
        let response = http()
            .post(binary.url("/v1/chat/completions"))
            .bearer_auth(KEY_A)
            .json(&body_with_images(&[(&url, None)]))
            .send()
            .await
            .expect("POST");
        assert_eq!(response.status(), 200);
    };

    send_one(host.url("/files/chart.gif")).await;
    assert_eq!(
        (
            decodes(&binary, "check").await,
            decodes(&binary, "convert").await
        ),
        (0.0, 1.0),
        "the GIF: converted, not also checked"
    );
    for _ in 0..3 {
        send_one(host.url("/files/chart.png")).await;
    }
    assert_eq!(
        (
            decodes(&binary, "check").await,
            decodes(&binary, "convert").await
        ),
        (1.0, 1.0),
        "the PNG: checked once, forwarded three times"
    );
    let (mime, _) = data_uri(&sent_image(&upstream, 1)["url"]);
    assert_eq!(mime, "image/png");
}
