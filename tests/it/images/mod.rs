//! Vision requests made portable, through the real server: image URLs
//! fetched safely from a real image host on 127.0.0.2 and inlined, formats
//! converted, `detail` carried out and stripped, sizes fitted, data URIs
//! validated, the fetch limits, the cache, and refusals.
//!
//! Every address these tests send traffic to is loopback. Refusals of
//! non-loopback addresses run inside a network namespace with only loopback
//! (`isolated`), so not even wrong code could reach them.
//!
//! This module holds what the topics share: test images, the gateway set-up
//! and the readers of what the upstream received.

mod convert;
mod fetch;
mod isolated;
mod memory;
mod real_world;

use std::io::Cursor;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use image::{DynamicImage, ImageFormat, Rgb, RgbImage};
use serde_json::{Value, json};

use crate::support::image_server::{ImageServer, raw_server};
use crate::support::{Iris, KEY_A, KEY_B, MockUpstream, base_config, http, skip};

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

impl Setup {
    /// Sends a request with one image, at `url`: its status and answer.
    async fn send_one(&self, url: &str) -> (u16, Value) {
        send(&self.iris, &body_with_images(&[(url, None)])).await
    }

    /// Sends a request with one image, at `url`, and expects a 400 with
    /// `code` naming that image; returns the message.
    async fn refuse_one(&self, url: &str, code: &str) -> String {
        refused(&self.iris, &body_with_images(&[(url, None)]), code, PARAM).await
    }

    /// The MIME type and bytes of the data URI the upstream last received at
    /// `messages[0].content[part]`.
    fn inlined(&self, part: usize) -> (String, Vec<u8>) {
        data_uri(&sent_image(&self.upstream, part)["url"])
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
    let response = iris.chat(KEY_A, body, &[]).await;
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

/// `s` percent-encoded, for a query string value.
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
