//! The decode budget (`images.max_decode_bytes`), held to the process's
//! real memory: the `iris` binary as a child process, so that the peak
//! resident size in its `/proc/<pid>/status` (`VmHWM`) measures it alone.
//!
//! The case is the security review's (16 requests at once, each with a
//! data URI of a 7000x7000 16-bit PNG, measured on the release binary: 994
//! MiB resident without the budget, 567 MiB with the default), scaled down
//! so that a debug build runs it in seconds rather than minutes: 6 requests
//! at once, each with a 4000x4000 16-bit
//! PNG, to an upstream that takes only JPEG, so every image is decoded (96
//! MB at 6 bytes a pixel) and converted (3 bytes a pixel more for its 8-bit
//! copy). Without the budget the jobs run one per core; with it, one at a
//! time: each needs 144 MB, more than the test's budget of 64 MiB, so each
//! takes the whole budget and runs alone (measured: 176 MiB of growth with
//! the budget, 331 MiB without, on two cores).

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use image::{DynamicImage, ImageBuffer, ImageFormat, Rgb};
use serde_json::json;

use crate::support::binary::Binary;
use crate::support::{KEY_A, MockUpstream, base_config, http};

const SIDE: u32 = 4000;
const REQUESTS: usize = 6;

/// What one image's conversion holds, in bytes a pixel: the 16-bit RGB
/// image (6) and its 8-bit copy (3), made at once.
const BYTES_A_PIXEL: u64 = 9;

const BUDGET: u64 = 64 << 20;

/// Beyond the largest reservation: the requests waiting in memory at once,
/// each with its body (a data URI of about 0.7 MB), its parsed copy and its
/// decoded PNG; the converted JPEGs on their way upstream; the jobs' fixed
/// costs; the allocator's rounding and the freed buffers it keeps for
/// reuse. Without the budget, two jobs at once (two cores) grow the process
/// by about 2 x 144 MB, above one image and this slack.
const SLACK: u64 = 96 << 20;

/// A SIDExSIDE RGB PNG at 16 bits a channel, a smooth gradient that
/// compresses well.
fn sixteen_bit_png() -> Vec<u8> {
    let image = DynamicImage::ImageRgb16(ImageBuffer::from_fn(SIDE, SIDE, |x, y| {
        Rgb([(x * 9) as u16, (y * 9) as u16, 30_000])
    }));
    let mut out = std::io::Cursor::new(Vec::new());
    image.write_to(&mut out, ImageFormat::Png).expect("png");
    out.into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_16_bit_pngs_at_once_stay_within_the_decode_budget() {
    let png = sixteen_bit_png();
    let uri = format!("data:image/png;base64,{}", BASE64.encode(&png));
    let upstream = MockUpstream::start().await;
    let config = base_config(
        &upstream.base_url(),
        &format!("\n[images]\nmax_decode_bytes = {BUDGET}\n"),
    )
    // The upstream's deadline runs from the request's start, image work
    // included, and these images queue for minutes in a debug build.
    .replacen(
        "timeout_ms = 2000\n",
        "timeout_ms = 900000\nimage_formats = [\"jpeg\"]\n",
        1,
    );
    let server = Binary::start(&config).await;
    let before = server.memory().rss_kib * 1024;

    let client = http();
    let url = server.url("/v1/chat/completions");
    let body = json!({"model": "other-model", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in this image?"},
        {"type": "image_url", "image_url": {"url": uri}},
    ]}]});
    let requests: Vec<_> = (0..REQUESTS)
        .map(|_| {
            let request = client
                .post(&url)
                .bearer_auth(KEY_A)
                .json(&body)
                .timeout(Duration::from_secs(900))
                .send();
            tokio::spawn(async move {
                let response = request.await.expect("an answer");
                (
                    response.status().as_u16(),
                    response.text().await.expect("body"),
                )
            })
        })
        .collect();
    for request in requests {
        let (status, text) = request.await.expect("join");
        assert_eq!(status, 200, "{text}");
    }
    let peak = server.memory().peak_kib * 1024;

    // Every image reached the upstream converted, whole.
    let received = upstream.received();
    assert_eq!(received.len(), REQUESTS);
    for request in &received {
        let url = request.json()["messages"][0]["content"][1]["image_url"]["url"].clone();
        let jpeg = url
            .as_str()
            .and_then(|url| url.strip_prefix("data:image/jpeg;base64,"))
            .map(|payload| BASE64.decode(payload).expect("base64"))
            .expect("a JPEG data URI");
        let dims = image::ImageReader::with_format(std::io::Cursor::new(jpeg), ImageFormat::Jpeg)
            .into_dimensions()
            .expect("a JPEG");
        assert_eq!(dims, (SIDE, SIDE));
    }

    let one_image = BYTES_A_PIXEL * u64::from(SIDE) * u64::from(SIDE);
    let bound = BUDGET.max(one_image) + SLACK;
    let grew = peak.saturating_sub(before);
    eprintln!(
        "resident before {} MiB, peak {} MiB: grew {} MiB (bound {} MiB)",
        before >> 20,
        peak >> 20,
        grew >> 20,
        bound >> 20
    );
    assert!(
        grew <= bound,
        "grew {} MiB, more than the budget (or one image alone) and slack: {} MiB",
        grew >> 20,
        bound >> 20
    );

    // The jobs queued for memory: a need above the whole budget runs alone.
    let metrics = client
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let waits = crate::support::metric_sum(&metrics, "iris_image_decode_waits_total", &[]);
    assert!(waits >= 1.0, "no job waited for the budget:\n{metrics}");
}
