//! One request, several attempts: the client is charged once, with the
//! answering attempt's usage; images are fetched once, and each attempt's
//! body follows its own upstream's image policy and model name.

use std::io::Cursor;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use image::{DynamicImage, ImageFormat, Rgb, RgbImage};
use serde_json::{Value, json};

use super::{Config, Iris, ask, assert_answered, farm};
use crate::support::image_server::ImageServer;
use crate::support::mock_upstream::Fault;
use crate::support::{KEY_A, MockUpstream, chat_body, stream_body};

/// What client `a` has been charged today, once its requests are settled.
async fn charged(iris: &Iris) -> u64 {
    iris.settled(KEY_A).await;
    iris.used(KEY_A, "tokens_per_day").await
}

#[tokio::test]
async fn the_client_is_charged_once_with_the_answering_attempts_usage() {
    let [a, b] = farm().await;
    let iris = Config::new()
        .upstream("accone-a", &a.base_url(), "")
        .upstream("accone-b", &b.base_url(), "")
        .model("accone", &[("accone-a", ""), ("accone-b", "priority = 1")])
        .single("accone-a-only", "accone-a")
        .routing("backoff_ms = 1\nallowed_fails = 1000")
        .start()
        .await;

    // Plain: a 503, then b answers.
    a.fail_next(1, Fault::status(503));
    let reply = ask(&iris, KEY_A, &chat_body("accone"), &[]).await;
    assert_answered(&reply, "accone-b", 2);
    let usage = reply.json()["usage"]["total_tokens"].as_u64().unwrap();
    assert_eq!(charged(&iris).await, usage, "b's usage, once");

    // Streamed, with the usage chunk: a reset, then b answers.
    a.fail_next(1, Fault::Reset);
    let mut body = stream_body("accone");
    body["stream_options"] = json!({"include_usage": true});
    let reply = ask(&iris, KEY_A, &body, &[]).await;
    assert_answered(&reply, "accone-b", 2);
    let streamed: u64 = reply
        .events()
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .find_map(|chunk| chunk["usage"]["total_tokens"].as_u64())
        .unwrap_or_else(|| panic!("no usage chunk: {}", reply.text));
    assert_eq!(charged(&iris).await, usage + streamed);

    // Failed attempts cost nothing: every attempt failing costs nothing.
    a.fail_next(3, Fault::status(500));
    let reply = ask(&iris, KEY_A, &chat_body("accone-a-only"), &[]).await;
    assert_eq!((reply.status, reply.attempts()), (500, 3));
    assert_eq!(charged(&iris).await, usage + streamed);
}

const IMAGE_HOST: &str = "127.0.0.2";

/// A PNG of two colours in stripes.
fn chart_png() -> Vec<u8> {
    let image = DynamicImage::ImageRgb8(RgbImage::from_fn(64, 48, |x, _| {
        if x % 16 < 8 {
            Rgb([200, 30, 30])
        } else {
            Rgb([250, 250, 250])
        }
    }));
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, ImageFormat::Png).unwrap();
    out.into_inner()
}

/// The image part of the request `mock` received `nth`: its `image_url`.
fn image_url_received(mock: &MockUpstream, nth: usize) -> (Value, Value) {
    let request = mock.received()[nth].json();
    (
        request["model"].clone(),
        request["messages"][0]["content"][1]["image_url"].clone(),
    )
}

/// A data URI's MIME type and decoded image size.
fn inlined(url: &Value) -> (String, (u32, u32)) {
    let uri = url.as_str().expect("a string URL");
    let (mime, payload) = uri
        .strip_prefix("data:")
        .and_then(|rest| rest.split_once(";base64,"))
        .unwrap_or_else(|| panic!("not a data URI: {}", &uri[..uri.len().min(80)]));
    let bytes = BASE64.decode(payload).expect("base64");
    let image = image::load_from_memory(&bytes).expect("an image");
    (mime.to_owned(), (image.width(), image.height()))
}

/// Iris with the image host allowed and no image cache (so a second fetch
/// would reach the host), model `name` on `a` then `b`.
async fn with_images(name: &str, a: (&MockUpstream, &str), b: (&MockUpstream, &str)) -> Iris {
    let (first, second) = (format!("{name}-a"), format!("{name}-b"));
    Config::new()
        .upstream(&first, &a.0.base_url(), a.1)
        .upstream(&second, &b.0.base_url(), b.1)
        .model(
            name,
            &[
                (&first, "upstream_model = \"model-a\""),
                (&second, "upstream_model = \"model-b\", priority = 1"),
            ],
        )
        .routing("backoff_ms = 1")
        .extra("[images]\nallowed_networks = [\"127.0.0.2/32\"]\ncache_bytes = 0")
        .start()
        .await
}

fn body_with_image(model: &str, url: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in this image?"},
        {"type": "image_url", "image_url": {"url": url, "detail": "high"}},
    ]}]})
}

#[tokio::test]
async fn images_are_fetched_once_and_each_attempt_gets_its_upstreams_body() {
    let host = ImageServer::start(IMAGE_HOST).await;
    host.add("chart.png", "image/png", chart_png());
    let [a, b] = farm().await;
    let iris = with_images(
        "accimg",
        (&a, "inline_images = true\nimage_formats = [\"png\"]"),
        (
            &b,
            "inline_images = true\nstrip_detail = true\nimage_formats = [\"jpeg\"]",
        ),
    )
    .await;
    a.fail_next(1, Fault::status(503));
    let reply = ask(
        &iris,
        KEY_A,
        &body_with_image("accimg", &host.url("/files/chart.png")),
        &[],
    )
    .await;
    assert_answered(&reply, "accimg-b", 2);
    assert_eq!(
        host.hits("/files/chart.png"),
        1,
        "fetched once for both attempts"
    );

    // a takes PNG and keeps `detail`; b takes only JPEG and strips it.
    let (model, url) = image_url_received(&a, 0);
    assert_eq!(model, "model-a");
    assert_eq!(inlined(&url["url"]), ("image/png".into(), (64, 48)));
    assert_eq!(url["detail"], "high");
    let (model, url) = image_url_received(&b, 0);
    assert_eq!(model, "model-b");
    assert_eq!(inlined(&url["url"]), ("image/jpeg".into(), (64, 48)));
    assert!(url.get("detail").is_none(), "{url}");
}

#[tokio::test]
async fn an_attempt_on_an_upstream_that_takes_urls_gets_the_url() {
    let host = ImageServer::start(IMAGE_HOST).await;
    host.add("chart.png", "image/png", chart_png());
    let [a, b] = farm().await;
    let iris = with_images(
        "accurl",
        (&a, "inline_images = true"),
        (&b, "inline_images = false"),
    )
    .await;
    let url = host.url("/files/chart.png");
    a.fail_next(1, Fault::status(502));
    let reply = ask(&iris, KEY_A, &body_with_image("accurl", &url), &[]).await;
    assert_answered(&reply, "accurl-b", 2);
    let (_, sent) = image_url_received(&a, 0);
    assert_eq!(inlined(&sent["url"]).0, "image/png");
    let (model, sent) = image_url_received(&b, 0);
    assert_eq!(model, "model-b");
    assert_eq!(
        sent["url"],
        url.as_str(),
        "b takes URLs: the URL as the client sent it"
    );
    assert_eq!(host.hits("/files/chart.png"), 1);
}
