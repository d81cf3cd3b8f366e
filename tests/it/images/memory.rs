//! The decode budget (`images.max_decode_bytes`), held to the process's
//! real memory: the `iris` binary as a child process, so that the peak
//! resident size in its `/proc/<pid>/status` (`VmHWM`) measures it alone.
//!
//! The case is the security review's: 16 requests at once, each with a data
//! URI of a 7000x7000 16-bit PNG, to an upstream that takes only JPEG, so
//! every image is decoded (294 MB at 6 bytes a pixel) and converted (3 bytes
//! a pixel more for its 8-bit copy). Without the budget the jobs run one per
//! core; with it, one at a time here: each needs 450 MB, more than the
//! test's budget of 256 MiB, so each takes the whole budget and runs alone.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use image::{DynamicImage, ImageBuffer, ImageFormat, Rgb};
use serde_json::{Value, json};

use crate::support::{KEY_A, MockUpstream, base_config, http, iris_command, write_config};

const SIDE: u32 = 7000;

/// What one image's conversion holds, in bytes a pixel: the 16-bit RGB
/// image (6) and its 8-bit copy (3), made at once.
const BYTES_A_PIXEL: u64 = 9;

const BUDGET: u64 = 256 << 20;

/// Beyond the largest reservation: the 16 requests waiting in memory at
/// once, each with its body (a 2 MB data URI), its parsed copy and its
/// decoded PNG (1.5 MB), about 6 MB each (measured: the process holds about
/// 250 MiB between two jobs, its 30 MiB at start included); the converted
/// JPEGs on their way upstream; the jobs' fixed costs; the allocator's
/// rounding and the freed buffers it keeps for reuse.
const SLACK: u64 = 192 << 20;

/// A 7000x7000 RGB PNG at 16 bits a channel, a smooth gradient that
/// compresses to about a megabyte.
fn sixteen_bit_png() -> Vec<u8> {
    let image = DynamicImage::ImageRgb16(ImageBuffer::from_fn(SIDE, SIDE, |x, y| {
        Rgb([(x * 9) as u16, (y * 9) as u16, 30_000])
    }));
    let mut out = std::io::Cursor::new(Vec::new());
    image.write_to(&mut out, ImageFormat::Png).expect("png");
    out.into_inner()
}

/// The real `iris serve`, killed on drop.
struct Server {
    child: Child,
    addr: String,
    _config: tempfile::NamedTempFile,
}

impl Server {
    async fn start(config: &str) -> Self {
        let file = write_config(config);
        let mut child = iris_command()
            .args(["serve", "--config"])
            .arg(file.path())
            .env("IRIS_LOG", "info")
            .env("IRIS_LOG_FORMAT", "json")
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn iris");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let json: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                if json["message"] == "iris is serving"
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(json["listen"].as_str().unwrap_or("").to_owned());
                }
            }
        });
        let addr = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)))
            .await
            .expect("join")
            .expect("iris starts");
        Self {
            child,
            addr,
            _config: file,
        }
    }

    /// A `kB` line of the process's `/proc/<pid>/status`, in bytes.
    fn status(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("/proc/<pid>/status");
        let line = status
            .lines()
            .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
            .unwrap_or_else(|| panic!("{field} in {status}"));
        let kb: u64 = line
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .expect("kB");
        kb * 1024
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_16_bit_pngs_at_once_stay_within_the_decode_budget() {
    if !std::path::Path::new("/proc/self/status").exists() {
        eprintln!("skipped: no /proc to read the peak resident size from");
        return;
    }
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
    let server = Server::start(&config).await;
    let before = server.status("VmRSS");

    let client = http();
    let url = format!("http://{}/v1/chat/completions", server.addr);
    let body = json!({"model": "other-model", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in this image?"},
        {"type": "image_url", "image_url": {"url": uri}},
    ]}]});
    let requests: Vec<_> = (0..16)
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
    let peak = server.status("VmHWM");

    // Every image reached the upstream converted, whole.
    let received = upstream.received();
    assert_eq!(received.len(), 16);
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
        .get(format!("http://{}/metrics", server.addr))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let waits = crate::support::metric_sum(&metrics, "iris_image_decode_waits_total", &[]);
    assert!(waits >= 1.0, "no job waited for the budget:\n{metrics}");
}
