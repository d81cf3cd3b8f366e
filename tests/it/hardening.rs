//! An outsider with only a client key, against the real server: bodies
//! shaped to cost memory or time, fields of the wrong type or given twice,
//! URLs where Iris does not look for them (issue 24's findings, each a test
//! that failed before its fix).

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::binary::Binary;
use crate::support::{Iris, KEY_A, KEY_B, MockUpstream, base_config, http, status_and_json};

const MIB: u64 = 1024 * 1024;

/// `{"model":"nope","messages":[` + `fill` repeated up to about `bytes` + `]}`.
fn messages_body(bytes: usize, fill: &str, model: &str) -> Vec<u8> {
    let head = format!(r#"{{"model":"{model}","messages":["#);
    let count = (bytes - head.len() - 2) / (fill.len() + 1);
    let mut body = Vec::with_capacity(bytes);
    body.extend_from_slice(head.as_bytes());
    for i in 0..count {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(fill.as_bytes());
    }
    body.extend_from_slice(b"]}");
    body
}

async fn post_raw(url: &str, key: &str, body: Vec<u8>) -> (u16, Value) {
    let response = http()
        .post(url)
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("POST");
    status_and_json(response).await
}

/// Resets the process's peak resident memory (`VmHWM`) to what it holds now.
fn reset_peak(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("clear_refs");
}

/// A request's parse costs a small multiple of its body, whatever the
/// JSON's shape, and is freed when the request ends. Before: the 7.2 MiB
/// body of 2.5 million empty messages took the process from 80 MB to 1.32 GB
/// resident (and it stayed there); 30 MiB reached 5.3 GB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_shaped_to_cost_memory_cost_a_small_multiple_of_their_size() {
    let upstream = MockUpstream::start().await;
    let iris = Binary::start(&base_config(&upstream.base_url(), "")).await;
    let url = iris.url("/v1/chat/completions");
    let unknown_fields = {
        let mut body = br#"{"model":"nope","messages":[{"role":"user","content":"hi"}]"#.to_vec();
        let mut i = 0u64;
        while body.len() < 30 * MIB as usize {
            body.extend_from_slice(format!(r#","f{i}":0"#).as_bytes());
            i += 1;
        }
        body.push(b'}');
        body
    };
    let cases: [(&str, Vec<u8>, u16, &str); 5] = [
        (
            "7.2 MiB of empty messages",
            messages_body(7_549_747, "{}", "nope"),
            400,
            "messages",
        ),
        (
            "30 MiB of empty messages",
            messages_body(30 * MIB as usize, "{}", "nope"),
            400,
            "messages",
        ),
        (
            "30 MiB of empty content parts",
            messages_body(
                30 * MIB as usize,
                r#"{"content":[{},{},{},{},{},{},{},{}]}"#,
                "nope",
            ),
            400,
            "messages[1024].content",
        ),
        (
            "30 MiB of messages with unknown fields",
            messages_body(
                30 * MIB as usize,
                r#"{"role":"user","content":"x","a":1,"b":2,"c":3,"d":4}"#,
                "nope",
            ),
            400,
            "messages",
        ),
        (
            "30 MiB of unknown top-level fields",
            unknown_fields,
            404,
            "model",
        ),
    ];
    // Twice: what the first round frees, the second reuses.
    let mut after_rounds = Vec::new();
    for round in 0..2 {
        for (what, body, status, param) in &cases {
            let size = body.len() as u64;
            let before = iris.memory();
            reset_peak(iris.pid());
            let (answered, json) = post_raw(&url, KEY_A, body.clone()).await;
            assert_eq!(answered, *status, "{what}: {json}");
            assert_eq!(json["error"]["param"], *param, "{what}: {json}");
            let peak = iris.memory().peak_kib.saturating_sub(before.rss_kib) * 1024;
            eprintln!(
                "round {round}, {what}: body {:.1} MiB, peak {:.1} MiB above the {:.1} MiB before",
                size as f64 / MIB as f64,
                peak as f64 / MIB as f64,
                before.rss_kib as f64 / 1024.0
            );
            // The body itself is held once, in one buffer: 4x the body is
            // the bound the issue aims for.
            assert!(
                peak <= 4 * size,
                "{what}: the parse took {} MiB for a {} MiB body",
                peak / MIB,
                size / MIB
            );
        }
        after_rounds.push(iris.memory().rss_kib * 1024);
    }
    // Freed when the requests end: the allocator keeps what it was given
    // back for the next request (mimalloc returns pages to the system when
    // the process allocates again), so a second round costs no more than
    // what threads started meanwhile keep for themselves (each has its own
    // heap: the runtime starts one whenever a parse moves off a worker) and
    // what the allocator had not yet purged when the round ended: at most
    // two bodies (measured: 0 to 16 MiB). Before, every round kept its
    // parse: 1.2 GB for the 7.2 MiB body alone.
    eprintln!(
        "resident after each round: {:?} MiB",
        after_rounds.iter().map(|b| b / MIB).collect::<Vec<_>>()
    );
    assert!(
        after_rounds[1] <= after_rounds[0] + 64 * MIB,
        "a second round of the same bodies grew the process: {after_rounds:?}"
    );
    assert_eq!(upstream.requests(), 0);
}

/// Large bodies are parsed where they cannot stall other connections.
/// Before: two bodies parsed at once held `/healthz` (2 worker threads) for
/// as long as their parse (measured: 1.9 s of 2.5 s). A hang detector, not a
/// speed test: the bound is relative to the parse, so a loaded machine
/// slows both sides (measured after: 70 ms of 0.7 s alone, 0.4 s of 1.9 s
/// beside the other tests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_being_parsed_do_not_hold_other_connections() {
    let upstream = MockUpstream::start().await;
    let iris = Binary::start(&base_config(&upstream.base_url(), "")).await;
    // Escaped text is the slowest JSON to read: every character decoded.
    let text = "\\u00e9".repeat(29 * MIB as usize / 6);
    let body = format!(r#"{{"model":"nope","messages":[{{"role":"user","content":"{text}"}}]}}"#)
        .into_bytes();
    let url = iris.url("/v1/chat/completions");
    let healthz = iris.url("/healthz");
    let client = http();
    // Warm: the connection pool and the server's first request.
    client.get(&healthz).send().await.expect("healthz");

    let parsing: Vec<_> = (0..2)
        .map(|_| {
            let (url, body) = (url.clone(), body.clone());
            tokio::spawn(async move { post_raw(&url, KEY_A, body).await })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    let started = Instant::now();
    while !parsing.iter().all(tokio::task::JoinHandle::is_finished) {
        let asked = Instant::now();
        let status = client
            .get(&healthz)
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .expect("healthz")
            .status();
        assert_eq!(status, 200);
        slowest = slowest.max(asked.elapsed());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let parse_time = started.elapsed();
    for task in parsing {
        let (status, json) = task.await.expect("join");
        assert_eq!(status, 404, "{json}");
    }
    eprintln!("two bodies parsed in {parse_time:?}; /healthz took at most {slowest:?}");
    assert!(
        slowest * 2 < parse_time,
        "/healthz waited {slowest:?} while two bodies were parsed ({parse_time:?})"
    );
}

/// [`base_config`] with clients `b` and `c` on the same daily budget.
/// JSON is UTF-8: a body with a byte that is not is refused, whichever
/// field holds it, and nothing reaches the upstream. Before, a stray byte in
/// a field Iris does not read went upstream as it came, for its parser to
/// make of it what it would.
#[tokio::test]
async fn a_body_that_is_not_utf8_is_refused_before_the_upstream() {
    let upstream = MockUpstream::start().await;
    let iris = Iris::start(&base_config(&upstream.base_url(), "")).await;
    for (path, body) in [
        (
            "/v1/chat/completions",
            &b"{\"model\":\"test-model\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"user\":\"\xff\"}"[..],
        ),
        (
            "/v1/chat/completions",
            b"{\"model\":\"test-model\",\"messages\":[{\"role\":\"user\",\"content\":\"h\xc3\"}]}",
        ),
        (
            "/v1/embeddings",
            b"{\"model\":\"test-model\",\"input\":\"a\",\"x\":\"\xfe\"}",
        ),
    ] {
        let (status, json) = post_raw(&iris.url(path), KEY_A, body.to_vec()).await;
        assert_eq!(status, 400, "{path}: {json}");
        assert_eq!(json["error"]["code"], "invalid_request", "{json}");
        assert_eq!(json["error"]["param"], Value::Null, "{json}");
        let message = json["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("not UTF-8"), "{message}");
    }
    assert_eq!(
        upstream.requests(),
        0,
        "nothing refused reached the upstream"
    );
}

/// An upstream's answer with a byte that is not UTF-8 in its text still
/// bills the usage it reports, and reaches the client as it came. Before,
/// the stray byte made the whole answer unreadable to Iris, which settled it
/// as if no usage had been reported.
#[tokio::test]
async fn an_answer_with_a_stray_byte_bills_its_usage_and_passes_as_it_came() {
    let upstream = MockUpstream::start().await;
    let iris = Iris::start(&budget_config(&upstream.base_url())).await;
    let usage = r#"{"prompt_tokens":1000,"completion_tokens":234,"total_tokens":1234}"#;
    let body = json!({"model": "other-model", "messages": [{"role": "user", "content": "hi"}]});
    let response = iris
        .chat(
            KEY_C,
            &body,
            &[("x-mock-stray-byte", "1"), ("x-mock-usage", usage)],
        )
        .await;
    assert_eq!(response.status(), 200);
    let bytes = response.bytes().await.expect("body");
    assert!(
        bytes.windows(6).any(|w| w == b"Hel\xfflo"),
        "the answer as the upstream sent it: {}",
        String::from_utf8_lossy(&bytes)
    );
    iris.settled(KEY_C).await;
    assert_eq!(iris.used(KEY_C, "tokens_per_day").await, 1234);
}

fn budget_config(upstream: &str) -> String {
    base_config(
        upstream,
        &format!(
            r#"[clients.budget]
tokens_per_day = 20000

[[clients]]
name = "c"
key = "{}"
[clients.budget]
tokens_per_day = 20000
"#,
            iris::keys::KeyHash::of(KEY_C)
        ),
    )
}

const KEY_C: &str = "test-key-c";

fn remaining_tokens(response: &reqwest::Response) -> u64 {
    response
        .headers()
        .get("x-ratelimit-remaining-tokens")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("x-ratelimit-remaining-tokens")
}

/// The reservation covers what is forwarded: `n` and the caps are refused
/// unless OpenAI would take them, and what goes upstream is what was
/// reserved. Before: `"n": "50"`, `50.0` and `[50]` were reserved as n = 1
/// and forwarded unchanged; `n: 100000` was reserved as 128; both caps set
/// reserved the smaller.
#[tokio::test]
async fn the_reservation_covers_what_is_forwarded() {
    let upstream = MockUpstream::start().await;
    let iris = Iris::start(&budget_config(&upstream.base_url())).await;
    let chat = |fields: Value| {
        let mut body =
            json!({"model": "other-model", "messages": [{"role": "user", "content": "Say hello"}]});
        for (key, value) in fields.as_object().expect("fields") {
            body[key] = value.clone();
        }
        body
    };
    for (fields, param) in [
        (json!({"n": "50", "max_tokens": 1000}), "n"),
        (json!({"n": 50.0, "max_tokens": 1000}), "n"),
        (json!({"n": [50], "max_tokens": 1000}), "n"),
        (json!({"n": 100000, "max_tokens": 1}), "n"),
        (json!({"n": 0}), "n"),
        (json!({"max_tokens": "25000"}), "max_tokens"),
        (json!({"max_completion_tokens": 0}), "max_completion_tokens"),
        (json!({"stream": "true"}), "stream"),
        (
            json!({"stream": true, "stream_options": {"include_usage": "no"}}),
            "stream_options.include_usage",
        ),
    ] {
        let (status, json) =
            status_and_json(iris.chat(KEY_B, &chat(fields.clone()), &[]).await).await;
        assert_eq!(status, 400, "{fields}: {json}");
        assert_eq!(json["error"]["code"], "invalid_request", "{fields}");
        assert_eq!(json["error"]["param"], param, "{fields}: {json}");
    }
    // The larger of two caps is what an upstream may generate.
    for fields in [
        json!({"max_completion_tokens": 1, "max_tokens": 25000}),
        json!({"max_tokens": 1, "max_completion_tokens": 25000}),
        json!({"max_tokens": 25000}),
    ] {
        let (status, json) =
            status_and_json(iris.chat(KEY_B, &chat(fields.clone()), &[]).await).await;
        assert_eq!(status, 429, "{fields}: {json}");
        assert_eq!(json["error"]["code"], "insufficient_quota", "{fields}");
    }
    assert_eq!(
        upstream.requests(),
        0,
        "nothing refused reached the upstream"
    );

    // Reserved as forwarded: n = 3 reserves 3 times the cap of n = 1.
    let one = iris
        .chat(KEY_B, &chat(json!({"max_tokens": 100})), &[])
        .await;
    let three = iris
        .chat(KEY_C, &chat(json!({"n": 3, "max_tokens": 100})), &[])
        .await;
    assert_eq!(one.status(), 200);
    assert_eq!(three.status(), 200);
    assert_eq!(remaining_tokens(&one) - remaining_tokens(&three), 200);
    assert_eq!(upstream.last().json()["n"], 3, "forwarded as checked");
}

/// Every URL in a content part is handled under the image policy or refused
/// with a `param` naming it. Before: an `input_image`'s URL, a file's
/// `file_url` and an extra `image_url` on a text part reached an upstream
/// with `inline_images = true` untouched.
#[tokio::test]
async fn urls_outside_image_parts_never_reach_the_upstream() {
    let upstream = MockUpstream::start().await;
    let config = base_config(&upstream.base_url(), "").replace(
        "timeout_ms = 2000\n",
        "timeout_ms = 2000\ninline_images = true\n",
    );
    let iris = Iris::start(&config).await;
    let target = "http://127.0.0.1:9/a.png";
    for (part, param) in [
        (
            json!({"type": "input_image", "image_url": target}),
            "messages[0].content[1].image_url",
        ),
        (
            json!({"type": "file", "file": {"file_url": target, "filename": "a.png"}}),
            "messages[0].content[1].file.file_url",
        ),
        (
            json!({"type": "text", "text": "look", "image_url": {"url": target}}),
            "messages[0].content[1].image_url",
        ),
        (
            json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "alt": target}}),
            "messages[0].content[1].image_url.alt",
        ),
        // Spelled as URL parsers still read as `http://127.0.0.1:9/a.png`.
        (
            json!({"type": "file", "file": {"file_url": "http:127.0.0.1:9/a.png"}}),
            "messages[0].content[1].file.file_url",
        ),
        (
            json!({"type": "file", "file": {"file_url": "http:\\127.0.0.1:9\\a.png"}}),
            "messages[0].content[1].file.file_url",
        ),
        (
            json!({"type": "file", "file": {"file_url": "ht\ttp://127.0.0.1:9/a.png"}}),
            "messages[0].content[1].file.file_url",
        ),
    ] {
        let body = json!({"model": "test-model", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"}, part
        ]}]});
        let (status, json) = status_and_json(iris.chat(KEY_A, &body, &[]).await).await;
        assert_eq!(status, 400, "{part}: {json}");
        assert_eq!(json["error"]["param"], param, "{part}: {json}");
    }
    assert_eq!(upstream.requests(), 0);
}

/// A field Iris interprets, given twice: 400 naming it. Before: `{"model":
/// "m-b", "model": "m-a"}` from a client allowed only `m-a` was checked as
/// `m-a` and forwarded with both keys, and an upstream keeping the first
/// served `m-b`.
#[tokio::test]
async fn a_field_iris_interprets_given_twice_is_refused() {
    let upstream = MockUpstream::start().await;
    let iris = Iris::start(&base_config(&upstream.base_url(), "")).await;
    let messages = r#"[{"role":"user","content":"hi"}]"#;
    for (body, param) in [
        // Client `b` may use only `other-model`.
        (
            format!(r#"{{"model":"test-model","model":"other-model","messages":{messages}}}"#),
            "model",
        ),
        (
            format!(
                r#"{{"model":"other-model","stream":false,"messages":{messages},"stream":true}}"#
            ),
            "stream",
        ),
        (
            format!(
                r#"{{"model":"other-model","messages":{messages},"max_tokens":1,"max_tokens":9999}}"#
            ),
            "max_tokens",
        ),
        (
            r#"{"model":"other-model","messages":[{"role":"user","content":"a","content":"b"}]}"#
                .to_owned(),
            "messages[0].content",
        ),
        // Given again in another case, which Go's `encoding/json` reads as
        // the same field: refused too.
        (
            format!(r#"{{"model":"other-model","Model":"test-model","messages":{messages}}}"#),
            "Model",
        ),
        (
            format!(r#"{{"model":"other-model","N":128,"messages":{messages}}}"#),
            "N",
        ),
    ] {
        let (status, json) = post_raw(
            &iris.url("/v1/chat/completions"),
            KEY_B,
            body.clone().into_bytes(),
        )
        .await;
        assert_eq!(status, 400, "{body}: {json}");
        assert_eq!(json["error"]["param"], param, "{body}: {json}");
    }
    assert_eq!(upstream.requests(), 0);
}
