//! The image path's speed: inlining a 1 MB and a 5 MB JPEG, cache cold and
//! warm, against simply downloading the same bytes in the same run; base64
//! throughput; and small text requests' latency through Iris while 8 large
//! images are re-encoded at once, against none.
//!
//!   cargo run --release --example bench_images [-- text | inline]
//!
//! "Inline" is what a request pays: parse the chat body, apply the upstream's
//! image policy (fetch, sniff, base64), write the body that goes upstream.
//! The image host is in-process on 127.0.0.2, like the integration tests'.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark")]

#[path = "../tests/it/support/image_server.rs"]
mod image_server;
#[path = "../tests/it/support/mock_upstream.rs"]
mod mock_upstream;

use std::io::Cursor;
use std::time::{Duration, Instant};

use image::{DynamicImage, Rgb, RgbImage};
use iris::images::{Format, ImagePolicy, Images, ImagesSettings};
use iris::openai::chat::ChatRequest;

/// The allocator the `iris` binary uses, so the figures are the server's:
/// large buffers are where allocators differ most.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const RUNS: usize = 25;

/// A noisy photo-like JPEG of about `target` bytes.
fn jpeg_of_about(target: usize) -> Vec<u8> {
    let mut side = 512u32;
    loop {
        let image = DynamicImage::ImageRgb8(RgbImage::from_fn(side, side, |x, y| {
            let n = x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503) ^ (x * y);
            Rgb([
                (n % 256) as u8,
                ((n >> 8) % 256) as u8,
                ((x + y) % 256) as u8,
            ])
        }));
        let mut out = Cursor::new(Vec::new());
        image
            .write_with_encoder(image::codecs::jpeg::JpegEncoder::new_with_quality(
                &mut out, 90,
            ))
            .expect("jpeg");
        let bytes = out.into_inner();
        if bytes.len() >= target {
            return bytes;
        }
        let grow = (target as f64 / bytes.len() as f64).sqrt() * 1.02;
        side = ((f64::from(side) * grow) as u32).max(side + 16);
    }
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// The bytes at `url`, downloaded into a buffer of their size.
async fn download(client: &reqwest::Client, url: &str) -> Vec<u8> {
    let mut response = client.get(url).send().await.expect("download");
    let mut body = Vec::with_capacity(response.content_length().unwrap_or(0) as usize);
    while let Some(chunk) = response.chunk().await.expect("chunk") {
        body.extend_from_slice(&chunk);
    }
    body
}

/// One request's image work, as the chat route does it.
async fn inline(images: &Images, upstream: &ImagePolicy, body: &[u8]) -> usize {
    let received = bytes::Bytes::copy_from_slice(body);
    let mut request = ChatRequest::parse(&received).expect("request");
    iris::rewrite::apply_image_policy(images, upstream, &mut request, &received)
        .await
        .expect("inlined");
    request.to_body(&received).len()
}

fn chat_body(url: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "model": "m",
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": url}},
        ]}],
    }))
    .expect("json")
}

#[tokio::main]
async fn main() {
    iris::init_tls();
    let host = image_server::ImageServer::start("127.0.0.2").await;
    let only = |part: &str| std::env::args().any(|a| a == part);
    if !only("text") {
        inline_and_base64(&host).await;
    }
    if !only("inline") {
        text_under_image_load(&host).await;
    }
}

async fn inline_and_base64(host: &image_server::ImageServer) {
    let mut settings = ImagesSettings {
        allowed_networks: vec!["127.0.0.2/32".parse().expect("cidr")],
        cache_bytes: 512 << 20,
        ..ImagesSettings::default()
    };
    settings.fetch.max_bytes = 32 << 20;
    let images = Images::new(&settings).expect("images");
    let upstream = ImagePolicy {
        inline: true,
        ..ImagePolicy::default()
    };
    let client = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .build()
        .expect("client");

    println!("image path benchmark: median of {RUNS} runs each, image host on 127.0.0.2\n");
    for (name, target) in [("1 MB", 1 << 20), ("5 MB", 5 << 20)] {
        let jpeg = jpeg_of_about(target);
        let file = format!("{}.jpg", name.replace(' ', ""));
        host.add(&file, "image/jpeg", jpeg.clone());
        let base = host.url(&format!("/files/{file}"));

        // Warm-up: connections, allocator, page faults.
        for i in 0..3 {
            let _ = download(&client, &format!("{base}?warmup={i}")).await;
            inline(
                &images,
                &upstream,
                &chat_body(&format!("{base}?warmup={i}")),
            )
            .await;
        }

        // Cold: a URL never seen (a fresh query string), alternating with a
        // bare download of the same bytes and their base64, so all see the
        // same conditions. The image cache keeps what it fetched and
        // encoded, so each cold inline writes into fresh memory (page
        // faults included); the bare download and the base64 keep theirs
        // too, for the same reason, rather than reuse the last run's pages.
        let (mut bare, mut encode, mut cold) = (Vec::new(), Vec::new(), Vec::new());
        let mut kept = Vec::new();
        for i in 0..RUNS {
            let url = format!("{base}?run={i}");
            let started = Instant::now();
            let downloaded = download(&client, &url).await;
            bare.push(started.elapsed());

            let started = Instant::now();
            let uri = iris::images::data_uri(Format::Jpeg, &downloaded);
            encode.push(started.elapsed());
            kept.push((downloaded, uri));

            let body = chat_body(&format!("{url}&cold=1"));
            let started = Instant::now();
            inline(&images, &upstream, &body).await;
            cold.push(started.elapsed());
        }
        drop(kept);

        // Warm: the same URL again and again, served from the cache.
        let body = chat_body(&format!("{base}?warm=1"));
        inline(&images, &upstream, &body).await;
        let mut warm = Vec::new();
        for _ in 0..RUNS {
            let started = Instant::now();
            inline(&images, &upstream, &body).await;
            warm.push(started.elapsed());
        }

        // The same, with the body arriving at about 64 MB/s (64 KiB a
        // millisecond), as from a fast real network rather than loopback.
        let slow = host.url(&format!("/slow/{file}?chunk_bytes=65536&chunk_ms=1"));
        let (mut bare_net, mut cold_net) = (Vec::new(), Vec::new());
        for i in 0..RUNS / 2 {
            let url = format!("{slow}&run={i}");
            let started = Instant::now();
            let _ = download(&client, &url).await;
            bare_net.push(started.elapsed());

            let body = chat_body(&format!("{url}&cold=1"));
            let started = Instant::now();
            inline(&images, &upstream, &body).await;
            cold_net.push(started.elapsed());
        }

        let (bare, encode, cold, warm) = (median(bare), median(encode), median(cold), median(warm));
        let (bare_net, cold_net) = (median(bare_net), median(cold_net));
        println!("{name} JPEG ({} bytes):", jpeg.len());
        println!("  loopback at full speed:");
        println!("    bare download        {}", ms(bare));
        println!("    base64 of it         {}", ms(encode));
        println!(
            "    inline, cache cold   {}  ({:.2}x the bare download, {:.2}x download + base64)",
            ms(cold),
            cold.as_secs_f64() / bare.as_secs_f64(),
            cold.as_secs_f64() / (bare + encode).as_secs_f64()
        );
        println!("    inline, cache warm   {}", ms(warm));
        println!("  body arriving at ~64 MB/s:");
        println!("    bare download        {}", ms(bare_net));
        println!(
            "    inline, cache cold   {}  ({:.2}x the bare download)",
            ms(cold_net),
            cold_net.as_secs_f64() / bare_net.as_secs_f64()
        );
        println!();
    }

    // base64: the data URI of 5 MB, as Iris writes it.
    let bytes = jpeg_of_about(5 << 20);
    let mut samples = Vec::new();
    for _ in 0..RUNS {
        let started = Instant::now();
        let uri = iris::images::data_uri(Format::Jpeg, &bytes);
        samples.push(started.elapsed());
        std::hint::black_box(uri);
    }
    let took = median(samples);
    println!(
        "base64 data URI of {} bytes: {}  ({:.0} MB/s)",
        bytes.len(),
        ms(took),
        bytes.len() as f64 / took.as_secs_f64() / 1e6
    );
}

/// Text requests sent one after another while this many image requests are
/// in flight at all times, each converting a large JPEG to fit
/// `max_image_bytes`.
const CONVERTING: usize = 8;
const TEXT_REQUESTS: usize = 300;
const KEY: &str = "bench-key";

/// Small chats through Iris (in-process, on its own multi-threaded runtime as
/// in production) with no image work, then while `CONVERTING` large images
/// are re-encoded at once: image work runs on the blocking pool, at most one
/// job per core, so text requests are not starved of the async workers.
async fn text_under_image_load(host: &image_server::ImageServer) {
    let upstream = mock_upstream::MockUpstream::start().await;
    upstream.state.keep_bodies(false);
    let config = format!(
        r#"
[store]
kind = "memory"

[images]
allowed_networks = ["127.0.0.2/32"]
max_bytes = 33554432
cache_bytes = 0

[[upstreams]]
name = "mock"
base_url = "{upstream}"
api_key = "upstream-key"
inline_images = true
max_image_bytes = 262144

[[models]]
name = "m"
upstream = "mock"

[[clients]]
name = "bench"
key = "{key}"
"#,
        upstream = upstream.base_url(),
        key = iris::keys::KeyHash::of(KEY),
    );
    let config = iris::config::parse(&config, &|_| None).expect("config");
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let state = iris::app::AppState::new(config).await.expect("state");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            tx.send(listener.local_addr().expect("addr")).expect("send");
            let _ = iris::server::run(listener, state, std::future::pending()).await;
        });
    });
    let iris = rx.await.expect("iris started");
    let chat = format!("http://{iris}/v1/chat/completions");

    let jpeg = jpeg_of_about(5 << 20);
    let (width, height) = iris::images::dimensions(&jpeg).expect("dims");
    host.add("large.jpg", "image/jpeg", jpeg.clone());
    let client = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .build()
        .expect("client");
    let text = serde_json::to_vec(&serde_json::json!({
        "model": "m",
        "messages": [{"role": "user", "content": "Say hello in five words."}],
        "max_tokens": 16,
    }))
    .expect("json");

    let texts = |client: reqwest::Client| {
        let (chat, text) = (chat.clone(), text.clone());
        async move {
            let mut latencies = Vec::with_capacity(TEXT_REQUESTS);
            for _ in 0..TEXT_REQUESTS {
                let started = Instant::now();
                let response = client
                    .post(&chat)
                    .bearer_auth(KEY)
                    .header("content-type", "application/json")
                    .body(text.clone())
                    .send()
                    .await
                    .expect("text request");
                assert_eq!(response.status(), 200);
                response.bytes().await.expect("body");
                latencies.push(started.elapsed());
            }
            latencies.sort();
            latencies
        }
    };
    // Warm-up, then text alone.
    texts(client.clone()).await;
    let alone = texts(client.clone()).await;

    // Text while CONVERTING image requests are always in flight, each a
    // fresh URL (nothing cached): fetch, decode, re-encode, downscale.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut converters = Vec::new();
    for worker in 0..CONVERTING {
        let (client, chat, stop) = (client.clone(), chat.clone(), stop.clone());
        let base = host.url("/files/large.jpg");
        converters.push(tokio::spawn(async move {
            let mut took = Vec::new();
            let mut run = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut body: serde_json::Value =
                    serde_json::from_slice(&chat_body(&format!("{base}?w={worker}&r={run}")))
                        .expect("json");
                body["model"] = serde_json::json!("m");
                run += 1;
                let started = Instant::now();
                let response = client
                    .post(&chat)
                    .bearer_auth(KEY)
                    .json(&body)
                    .send()
                    .await
                    .expect("image request");
                assert_eq!(response.status(), 200, "{:?}", response.text().await);
                took.push(started.elapsed());
            }
            took
        }));
    }
    // Let every converter start before measuring.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let loaded = texts(client.clone()).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut images = Vec::new();
    for converter in converters {
        images.extend(converter.await.expect("converter"));
    }

    let pct = |l: &[Duration], p: f64| l[((l.len() - 1) as f64 * p).round() as usize];
    println!(
        "small text chats through Iris, {TEXT_REQUESTS} one after another \
         (2-core machine; Iris on a multi-threaded runtime):"
    );
    for (name, l) in [
        ("no image work", &alone),
        ("8 images converting at once", &loaded),
    ] {
        println!(
            "  {name:<28} p50 {}  p99 {}  max {}",
            ms(pct(l, 0.5)),
            ms(pct(l, 0.99)),
            ms(pct(l, 1.0))
        );
    }
    println!(
        "  image requests meanwhile: {} done, each a {} byte {width}x{height} JPEG \
         fitted to 256 KiB, median {}",
        images.len(),
        jpeg.len(),
        ms(median(images))
    );
}
