//! Fetching: many images per request, the cache, the address policy on
//! loopback, redirects, the limits while reading, and the metrics.

use super::*;

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
    assert!(s.inlined(1).1 == png);
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
        let message = s.refuse_one(&url, "image_url_forbidden").await;
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
    let (status, answer) = s.send_one(&url).await;
    assert_eq!(status, 200, "{answer}");
    assert!(s.inlined(1).1 == png);
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
        let message = s.refuse_one(&url, "image_url_forbidden").await;
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
        let message = s.refuse_one(&url, code).await;
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

    let (status, answer) = s.send_one(&s.host.url("/chain/3/a.png")).await;
    assert_eq!(status, 200, "three redirects are allowed: {answer}");
    assert!(s.inlined(1).1 == png);

    for path in ["/chain/4/a.png", "/loop"] {
        let message = s.refuse_one(&s.host.url(path), "image_fetch_failed").await;
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
        let message = s.refuse_one(&url, "image_url_forbidden").await;
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
            let message = s.refuse_one(&url, "image_url_forbidden").await;
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
    let message = s.refuse_one(&url, "image_url_forbidden").await;
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
    let message = s.refuse_one(&url, "image_url_forbidden").await;
    assert_eq!(
        message,
        "The image URL redirects to http:, which is refused: it cannot be parsed as a URL."
    );

    // Control: 300 towards an allowed URL is a status failure, and a 302
    // towards one is followed.
    let to_png = urlencode(&s.host.url("/files/a.png"));
    let url = s.host.url(&format!("/redirect?status=300&to={to_png}"));
    s.refuse_one(&url, "image_fetch_failed").await;
    let url = s.host.url(&format!("/redirect?status=302&to={to_png}"));
    let (status, answer) = s.send_one(&url).await;
    assert_eq!(status, 200, "{answer}");
    assert!(s.inlined(1).1 == png);

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

// --- limits while reading -------------------------------------------------------------------

#[tokio::test]
async fn one_deadline_covers_the_whole_fetch_redirects_included() {
    let s = setup(INLINE, &format!("{ALLOW_HOST}\nfetch_timeout_ms = 1000")).await;
    let png = encode(&photo(200, 200), ImageFormat::Png);
    s.host.add("a.png", "image/png", png.clone());

    // Three hops of 400 ms: each within the deadline, together not.
    let started = Instant::now();
    let message = s
        .refuse_one(
            &s.host.url("/chain/3/a.png?delay_ms=400"),
            "image_fetch_failed",
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
    s.refuse_one(
        &s.host.url("/slow/a.png?chunk_ms=100"),
        "image_fetch_failed",
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
}

/// Found by probing: a request waiting on another's fetch of the same URL
/// took it over with a deadline of its own when that one's client hung up,
/// so it waited for the first fetch and then a whole deadline more.
#[tokio::test]
async fn a_request_waiting_on_another_fetch_keeps_its_own_deadline() {
    let s = setup(INLINE, &format!("{ALLOW_HOST}\nfetch_timeout_ms = 1000")).await;
    let png = encode(&photo(200, 200), ImageFormat::Png);
    assert!(png.len() > 30 * 1024, "trickles in for seconds");
    s.host.add("a.png", "image/png", png);
    let body = body_with_images(&[(&s.host.url("/slow/a.png?chunk_ms=100"), None)]);

    // The first request fetches it, and its client hangs up at 800 ms.
    let impatient = async {
        let sent = http()
            .post(s.iris.url("/v1/chat/completions"))
            .bearer_auth(KEY_A)
            .timeout(Duration::from_millis(800))
            .json(&body)
            .send()
            .await;
        assert!(sent.is_err(), "it hung up before any answer");
    };
    // The second waits on that fetch, then takes it over.
    let waiting = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        let message = refused(&s.iris, &body, "image_fetch_failed", PARAM).await;
        (started.elapsed(), message)
    };
    let ((), (waited, message)) = tokio::join!(impatient, waiting);
    assert!(message.contains("longer than 1000 ms"), "{message}");
    // Its own deadline (1000 ms), not the first's hang-up and then a
    // deadline more (about 1750 ms).
    assert!(waited < Duration::from_millis(1450), "{waited:?}");
    assert_eq!(s.host.hits("/slow/a.png"), 2, "taken over once");
}

#[tokio::test]
async fn the_byte_cap_holds_whatever_content_length_says() {
    let s = setup(INLINE, &format!("{ALLOW_HOST}\nmax_bytes = 100000")).await;
    // No Content-Length: chunked.
    s.refuse_one(&s.host.url("/chunked/1000000"), "image_too_large")
        .await;
    // No Content-Length and no chunking: the body runs to the connection's end.
    let mut until_close =
        b"HTTP/1.1 200 OK\r\ncontent-type: image/png\r\nconnection: close\r\n\r\n\x89PNG\r\n\x1a\n"
            .to_vec();
    until_close.resize(until_close.len() + 1_000_000, 0);
    let (addr, _) = raw_server(IMAGE_HOST, until_close, false).await;
    s.refuse_one(&format!("http://{addr}/a.png"), "image_too_large")
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
    s.refuse_one(&format!("http://{addr}/a.png"), "image_too_large")
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
    assert!(s.inlined(1).1 == png);
    // An image of exactly the cap is fine.
    let mut exact = encode(&chart(8, 8), ImageFormat::Png);
    exact.resize(100_000, 0);
    s.host.add("exact.png", "image/png", exact.clone());
    let (status, answer) = s.send_one(&s.host.url("/files/exact.png")).await;
    assert_eq!(status, 200, "{answer}");
    assert!(s.inlined(1).1 == exact);
}

#[tokio::test]
async fn compressed_bodies_are_refused_not_inflated() {
    let s = setup(INLINE, ALLOW_HOST).await;
    s.host
        .add("a.png", "image/png", encode(&chart(8, 8), ImageFormat::Png));
    let message = s
        .refuse_one(&s.host.url("/gzip/a.png"), "image_fetch_failed")
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
        let message = s
            .refuse_one(&s.host.url(&format!("/files/{name}")), "image_too_large")
            .await;
        assert!(message.contains("pixels"), "{message}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}

#[tokio::test]
async fn http_errors_and_dead_hosts_are_fetch_failures() {
    let s = setup(INLINE, ALLOW_HOST).await;
    for path in ["/status/500", "/status/404", "/files/nothing-here.png"] {
        s.refuse_one(&s.host.url(path), "image_fetch_failed").await;
    }
    // A port nobody listens on.
    let closed = std::net::TcpListener::bind((IMAGE_HOST, 0)).expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    s.refuse_one(
        &format!("http://{IMAGE_HOST}:{port}/a.png"),
        "image_fetch_failed",
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
