//! Faults, and what is never lost through them (docs/durability.md): an
//! upstream that resets, answers garbage or too much, or never answers; the
//! real `iris` binary killed with `kill -9` under load and restarted on its
//! SQLite file; SIGTERM with live streams, and with one that outlasts the
//! grace; Redis killed and restarted under three instances at concurrency 50.
//!
//! Expected charges come from what the mock upstream reported, or from
//! OpenAI's tokenizer ([`o200k`]) where Iris had to count: never from Iris's
//! own estimate.
//!
//! Faults covered elsewhere, with the same harness: a stream that dies, stalls
//! or ends without `[DONE]` (`routing::streams`), a client hanging up
//! mid-stream (`budget::a_client_hanging_up_mid_stream_pays_for_what_was_generated`,
//! `gateway::a_client_hanging_up_cancels_the_upstream_stream`), failover on
//! resets and garbage (`routing::failover`), one Redis instance per
//! `on_unavailable` mode through a crash (`redis::a_redis_crash_and_restart_is_survived_as_on_unavailable_says`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::support::binary::Binary;
use crate::support::mock_upstream::Fault;
use crate::support::redis::{RedisProcess, store_toml, with_store};
use crate::support::{
    Iris, KEY_B, MockUpstream, base_config, chat_body, http, iris_command, o200k, stream_body,
    usage_row, write_config,
};

/// [`base_config`] on the SQLite store in `db` (the spend log in the same
/// file), client `b` on a daily budget, `extra` appended.
fn sqlite_config(upstream: &str, db: &std::path::Path, extra: &str) -> String {
    with_store(
        &base_config(
            upstream,
            &format!("[clients.budget]\ntokens_per_day = 1000000\n{extra}"),
        ),
        &format!(
            "[store]\nkind = \"sqlite\"\npath = {:?}\n",
            db.display().to_string()
        ),
    )
}

/// The `usage` a response reported: a plain body's, or a stream's usage
/// chunk's (the request asks for it). `None` when it did not come whole.
async fn reported_total(response: reqwest::Response) -> Option<u64> {
    let text = response.text().await.ok()?;
    if text.starts_with('{') {
        return serde_json::from_str::<Value>(&text).ok()?["usage"]["total_tokens"].as_u64();
    }
    if !text.ends_with("data: [DONE]\n\n") {
        return None;
    }
    text.lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter_map(|data| serde_json::from_str::<Value>(data).ok())
        .find_map(|chunk| chunk["usage"]["total_tokens"].as_u64())
}

/// Request `i` of a load: every other one streamed (asking for its usage).
fn nth_body(i: usize) -> Value {
    if i.is_multiple_of(2) {
        chat_body("other-model")
    } else {
        let mut body = stream_body("other-model");
        body["stream_options"] = json!({"include_usage": true});
        body
    }
}

/// `iris usage`'s figure for client `b`'s `tokens_per_day`, read from the file.
fn used_on_disk(config: &str) -> u64 {
    usage_row(config, "b", "tokens_per_day")[3]
        .parse()
        .expect("a number")
}

/// Client `b`'s `tokens_per_day` as a running server's `/v1/usage` says.
async fn used_today(iris: &Binary) -> u64 {
    let usage: Value = http()
        .get(iris.url("/v1/usage"))
        .bearer_auth(KEY_B)
        .send()
        .await
        .expect("usage")
        .json()
        .await
        .expect("json");
    usage["windows"]["tokens_per_day"]["used"]
        .as_u64()
        .unwrap_or_else(|| panic!("no tokens_per_day in {usage}"))
}

/// Before the fix, settlement was written behind the response (every
/// second): a crash right after complete answers lost their charge (a run
/// on main: 40 requests, `kill -9`, 24 of them missing). Now each response's
/// last byte waits for its settlement, and its spend record, to be written.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_loses_no_charge_of_a_complete_response() {
    let upstream = MockUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = sqlite_config(&upstream.base_url(), &dir.path().join("iris.db"), "");
    let mut iris = Binary::start(&config).await;

    // 40 requests from 8 clients at once, half of them streamed.
    let client = http();
    let mut workers = Vec::new();
    for worker in 0..8 {
        let (client, url) = (client.clone(), iris.url("/v1/chat/completions"));
        workers.push(tokio::spawn(async move {
            let mut totals = Vec::new();
            for i in (worker..40).step_by(8) {
                let response = client
                    .post(&url)
                    .bearer_auth(KEY_B)
                    .json(&nth_body(i))
                    .send()
                    .await
                    .expect("request");
                assert_eq!(response.status(), 200);
                totals.push(reported_total(response).await.expect("complete"));
            }
            totals
        }));
    }
    let mut received = Vec::new();
    for worker in workers {
        received.extend(worker.await.expect("worker"));
    }
    // The last byte of every answer is in; nothing else may run.
    iris.kill9();
    let charged: u64 = received.iter().sum();
    assert_eq!(received.len(), 40);

    assert_eq!(
        used_on_disk(&config),
        charged,
        "every complete answer's charge is on disk after kill -9"
    );
    // And every answer's spend record, committed in the same transaction
    // as its settlement (before, written behind: 0 of 40 kept).
    let output = iris_command()
        .args(["usage", "--since", "0d", "--format", "json", "--config"])
        .arg(write_config(&config).path())
        .output()
        .expect("iris usage");
    let report: Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(report["data"][0]["requests"], 40, "{report}");
    assert_eq!(report["data"][0]["total_tokens"], charged, "{report}");
    // And a restart on the same file serves from it.
    let iris = Binary::start(&config).await;
    assert_eq!(used_today(&iris).await, charged);
}

/// SIGTERM with streams in flight: every stream finishes whole within the
/// grace, the process exits 0, and the usage and the spend log of every
/// stream are in the file afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_finishes_live_streams_and_persists_their_usage() {
    let upstream = MockUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    // A grace the streams fit in on a loaded machine: past it they would
    // be cut with `server_shutting_down` (and not end with `[DONE]`).
    let config = sqlite_config(&upstream.base_url(), &dir.path().join("iris.db"), "")
        .replace("shutdown_grace_ms = 2000", "shutdown_grace_ms = 20000");
    let mut iris = Binary::start(&config).await;

    let client = http();
    let mut streams = Vec::new();
    for i in 0..5 {
        let mut body = nth_body(1);
        body["messages"][0]["content"] = json!(format!("Stream {i}, please"));
        let response = client
            .post(iris.url("/v1/chat/completions"))
            .bearer_auth(KEY_B)
            .header("x-mock-chunks", "6")
            .header("x-mock-chunk-delay-ms", "150")
            .json(&body)
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200);
        streams.push(tokio::spawn(reported_total(response)));
    }
    let status = iris.terminate().await;
    let mut charged = 0;
    for stream in streams {
        charged += stream
            .await
            .expect("join")
            .expect("each stream ends whole, with [DONE]");
    }
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0");
    assert_eq!(used_on_disk(&config), charged, "usage flushed");

    let output = iris_command()
        .args(["usage", "--since", "0d", "--format", "json", "--config"])
        .arg(write_config(&config).path())
        .output()
        .expect("iris usage");
    let report: Value = serde_json::from_slice(&output.stdout).expect("json");
    let row = &report["data"][0];
    assert_eq!(row["requests"], 5, "{report}");
    assert_eq!(row["errors"], 0, "{report}");
    assert_eq!(row["total_tokens"], charged, "{report}");
}

/// SIGTERM with a stream that outlasts the grace (a word a second, the
/// grace 300 ms): the stream gets the words generated so far, then one
/// error event `server_shutting_down` and no `[DONE]`; the process still
/// exits 0; no usage having come, the client is charged its prompt and the
/// words it was sent, on disk after the exit, and the spend record says
/// why it ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_outlasting_the_shutdown_grace_is_cut_and_charged_what_was_generated() {
    let upstream = MockUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("iris.db");
    let config = sqlite_config(&upstream.base_url(), &db, "")
        .replace("shutdown_grace_ms = 2000", "shutdown_grace_ms = 300");
    let mut iris = Binary::start(&config).await;

    let mut body = stream_body("other-model");
    body["stream_options"] = json!({"include_usage": true});
    let response = http()
        .post(iris.url("/v1/chat/completions"))
        .bearer_auth(KEY_B)
        .header("x-mock-chunks", "30")
        .header("x-mock-chunk-delay-ms", "1000")
        .json(&body)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut text = String::new();
    while !text.contains("word0") {
        let chunk = stream.next().await.expect("more").expect("chunk");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    // Read on while the server shuts down.
    let rest = tokio::spawn(async move {
        while let Some(chunk) = stream.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.expect("chunk")));
        }
        text
    });
    let status = iris.terminate().await;
    let text = tokio::time::timeout(Duration::from_secs(10), rest)
        .await
        .expect("the stream ends")
        .expect("join");
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0");

    let events: Vec<Value> = text
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .map(|data| serde_json::from_str(data).unwrap_or_else(|_| panic!("{data} in {text}")))
        .collect();
    let last = events.last().expect("events");
    assert_eq!(last["error"]["code"], "server_shutting_down", "{text}");
    assert_eq!(last["error"]["type"], "server_error", "{text}");
    assert!(!text.contains("[DONE]"), "{text}");
    let words: String = events
        .iter()
        .filter_map(|event| event["choices"][0]["delta"]["content"].as_str())
        .collect();
    let sent = words.split_whitespace().count();
    assert!(sent < 30, "cut before its end: {words}");
    let completion = o200k::WORDS[sent];

    // Charged the prompt and the words sent, as OpenAI's tokenizer counts them.
    assert_eq!(used_on_disk(&config), o200k::SAY_HELLO + completion);
    let db = rusqlite::Connection::open(&db).expect("open");
    let record = db
        .query_row(
            "SELECT status, error_code, stream, prompt_tokens, completion_tokens FROM spend_log",
            [],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, bool>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            },
        )
        .expect("one spend record");
    assert_eq!(
        record,
        (
            200,
            Some("server_shutting_down".to_owned()),
            true,
            o200k::SAY_HELLO as i64,
            completion as i64
        )
    );
}

/// What a client sees of one upstream fault, and what it was charged.
struct Seen {
    status: u16,
    /// The error code: of an error body, or of a stream's error event.
    code: Option<String>,
    /// The stream ended with `[DONE]`, or the plain body was whole JSON.
    whole: bool,
    bytes: usize,
    text: String,
    charged: u64,
}

async fn see(iris: &Iris, stream: bool) -> Seen {
    let upstream_body = if stream {
        stream_body("other-model")
    } else {
        chat_body("other-model")
    };
    let before = iris.used(KEY_B, "tokens_per_day").await;
    let response = iris.chat(KEY_B, &upstream_body, &[]).await;
    let status = response.status().as_u16();
    let text = match response.bytes().await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => format!("(body failed: {e})"),
    };
    iris.settled(KEY_B).await;
    let charged = iris.used(KEY_B, "tokens_per_day").await - before;
    let code = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
        .or_else(|| {
            text.lines()
                .filter_map(|line| line.strip_prefix("data: "))
                .filter_map(|data| serde_json::from_str::<Value>(data).ok())
                .find_map(|event| event["error"]["code"].as_str().map(str::to_owned))
        });
    let whole = if stream {
        text.ends_with("data: [DONE]\n\n")
    } else {
        serde_json::from_str::<Value>(&text).is_ok()
    };
    Seen {
        status,
        code,
        whole,
        bytes: text.len(),
        text,
        charged,
    }
}

/// Each upstream fault, on a model with one deployment: the status and
/// error code the client gets, and what it is charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_upstream_fault_gets_a_clear_answer_and_a_fair_charge() {
    let upstream = MockUpstream::start().await;
    let config = base_config(
        &upstream.base_url(),
        "[routing]\nretries = 1\nbackoff_ms = 1\n[clients.budget]\ntokens_per_day = 100000000\n",
    )
    .replace("timeout_ms = 2000", "timeout_ms = 800");
    let iris = Iris::start(&config).await;
    // The prompt of every request below, as OpenAI's tokenizer counts it.
    let prompt = o200k::SAY_HELLO;

    // Reset before the response head: retried, then 502, nothing charged.
    upstream.fail_always(Fault::Reset);
    let seen = see(&iris, false).await;
    assert_eq!(
        (seen.status, seen.code.as_deref(), seen.charged),
        (502, Some("upstream_unavailable"), 0)
    );

    // Reset mid-stream: 200, then one error event and no [DONE]; charged
    // the prompt and the two words generated.
    upstream.fail_always(Fault::DieAfter(2));
    let seen = see(&iris, true).await;
    assert_eq!(seen.status, 200);
    assert_eq!(seen.code.as_deref(), Some("upstream_stream_interrupted"));
    assert!(!seen.whole);
    assert_eq!(seen.charged, prompt + o200k::WORDS[2]);

    // Reset after the finish chunk, before [DONE]: what was held back for
    // the end (the finish chunk) still comes, then the error event. The
    // usage chunk Iris asked for came before the reset: charged what the
    // upstream reported (the mock: a token per 4 bytes of the body it
    // received, one per word).
    upstream.fail_always(Fault::DieBeforeDone(2));
    let seen = see(&iris, true).await;
    assert_eq!(seen.status, 200);
    assert!(
        seen.text.contains(r#""finish_reason":"stop""#),
        "{}",
        seen.text
    );
    assert_eq!(seen.code.as_deref(), Some("upstream_stream_interrupted"));
    assert!(!seen.whole);
    let reported = upstream.last().body.len() as u64 / 4 + 2;
    assert_eq!(seen.charged, reported);

    // 200 with a body that is not JSON at all: 502, nothing charged.
    upstream.fail_always(Fault::GarbageJson);
    let seen = see(&iris, false).await;
    assert_eq!(
        (seen.status, seen.code.as_deref(), seen.charged),
        (502, Some("upstream_unavailable"), 0)
    );

    // 200 with JSON cut off half-way: relayed as it came (the head was
    // fine), charged its prompt as counted, no usage being readable.
    upstream.fail_always(Fault::TruncatedJson);
    let seen = see(&iris, false).await;
    assert_eq!((seen.status, seen.whole), (200, false));
    assert_eq!(seen.charged, prompt);

    // 200 event stream that is an HTML page: 502, nothing charged.
    upstream.fail_always(Fault::GarbageSse);
    let seen = see(&iris, true).await;
    assert_eq!(
        (seen.status, seen.code.as_deref(), seen.charged),
        (502, Some("upstream_unavailable"), 0)
    );

    // A body of 24 MiB (over the 8 MiB Iris keeps to read a usage from):
    // relayed whole, never collected; charged exactly its reported usage
    // all the same.
    let size = 24 << 20;
    upstream.fail_always(Fault::Huge(size));
    let seen = see(&iris, false).await;
    assert_eq!((seen.status, seen.whole), (200, true));
    assert!(seen.bytes > size);
    let answer: Value = serde_json::from_str(&seen.text).expect("whole JSON");
    let reported = answer["usage"]["total_tokens"].as_u64().expect("usage");
    assert!(reported > (size / 4) as u64, "{reported}");
    assert_eq!(seen.charged, reported);

    // Never answers: 504 after the upstream's timeout, nothing charged.
    upstream.fail_always(Fault::Hang);
    let seen = see(&iris, false).await;
    assert_eq!(
        (seen.status, seen.code.as_deref(), seen.charged),
        (504, Some("upstream_timeout"), 0)
    );

    upstream.heal();
    assert_eq!(iris.status("/readyz").await, 200);
}

/// The total charged by each answer with a reported usage.
fn total_of(answer: &Value) -> u64 {
    answer["usage"]["total_tokens"].as_u64().unwrap_or(0)
}

/// Redis killed and restarted (with its append-only file, so it comes back
/// with its data) under three instances and 50 concurrent clients on one
/// small budget, `on_unavailable = "reject"`: while it is down every request
/// fails fast with 503 `store_unavailable`; once it is back the instances
/// serve again without a restart, the budget is enforced again, and over
/// the whole run no more was granted than the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_under_load_fails_fast_recovers_and_never_overspends() {
    let Some(redis) = RedisProcess::prepare() else {
        return;
    };
    let mut redis = redis.persistent();
    redis.start().await;
    let upstream = MockUpstream::start().await;
    let budget = 12_000;
    let store = store_toml(
        &redis.url(),
        "iris",
        "on_unavailable = \"reject\"\ntimeout_ms = 300",
    );
    let config = with_store(
        &base_config(
            &upstream.base_url(),
            &format!("[clients.budget]\ntokens_per_day = {budget}\n"),
        ),
        &store,
    );
    let mut fleet = Vec::new();
    for _ in 0..3 {
        fleet.push(Arc::new(Iris::start(&config).await));
    }
    let mut body = chat_body("other-model");
    body["max_tokens"] = json!(40);

    let stop = Arc::new(AtomicBool::new(false));
    let redis_down = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for i in 0..50 {
        let (iris, stop, down, body) = (
            Arc::clone(&fleet[i % 3]),
            Arc::clone(&stop),
            Arc::clone(&redis_down),
            body.clone(),
        );
        workers.push(tokio::spawn(async move {
            // (status, code, tokens granted, how long, Redis down when sent)
            let mut seen = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let was_down = down.load(Ordering::SeqCst);
                let started = Instant::now();
                let response = iris.chat(KEY_B, &body, &[("x-mock-delay-ms", "100")]).await;
                let status = response.status().as_u16();
                let answer: Value = response.json().await.unwrap_or(Value::Null);
                let code = answer["error"]["code"].as_str().unwrap_or("").to_owned();
                seen.push((status, code, total_of(&answer), started.elapsed(), was_down));
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            seen
        }));
    }

    tokio::time::sleep(Duration::from_millis(400)).await;
    redis.kill();
    redis_down.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    redis_down.store(false, Ordering::SeqCst);
    redis.start().await;
    // Until the budget is spent and refused on every instance.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut granted_here = 0;
    loop {
        let mut refused = 0;
        for iris in &fleet {
            let response = iris.chat(KEY_B, &body, &[]).await;
            let answer: Value = response.json().await.unwrap_or(Value::Null);
            granted_here += total_of(&answer);
            refused += usize::from(answer["error"]["code"] == "insufficient_quota");
        }
        if refused == fleet.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the budget is never enforced again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let mut seen = Vec::new();
    for worker in workers {
        seen.extend(worker.await.expect("worker"));
    }

    let granted: u64 = seen.iter().map(|s| s.2).sum::<u64>() + granted_here;
    let count = |status: u16| seen.iter().filter(|s| s.0 == status).count();
    eprintln!(
        "redis kill/restart: {} requests: {} granted ({granted} tokens of {budget}), {} 503, {} 429; slowest {:?}",
        seen.len(),
        count(200),
        count(503),
        count(429),
        seen.iter().map(|s| s.3).max().unwrap_or_default()
    );
    for (status, code, _, took, _) in &seen {
        match status {
            200 => {}
            503 => assert_eq!(code, "store_unavailable"),
            429 => assert!(
                ["insufficient_quota", "rate_limit_exceeded"].contains(&code.as_str()),
                "{code}"
            ),
            other => panic!("unexpected {other} {code}"),
        }
        // Not a speed test: a request that waited on the dead Redis would
        // wait for the lease (minutes), not `timeout_ms` (0.3 s).
        assert!(
            *took < Duration::from_secs(5),
            "a request waited {took:?} (Redis down or not)"
        );
    }
    assert!(
        seen.iter().any(|s| s.0 == 503 && s.4),
        "the outage was seen"
    );
    assert!(count(200) > 0 && count(429) > 0);
    assert!(
        granted <= budget,
        "granted {granted} tokens of a {budget} budget"
    );
    for iris in &fleet {
        iris.settled(KEY_B).await;
    }
    assert_eq!(
        fleet[0].used(KEY_B, "tokens_per_day").await,
        granted,
        "Redis holds exactly what was granted: no settlement lost in the outage"
    );
}

/// The SQLite store's write-ahead log is one process's: a second server on
/// the same file (a restart overlapping the old process's drain) waits for
/// the first to stop rather than replay and remove its log under it, then
/// starts with everything the first charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_server_on_one_store_file_waits_for_the_first() {
    let upstream = MockUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = sqlite_config(&upstream.base_url(), &dir.path().join("iris.db"), "");
    let mut first = Binary::start(&config).await;
    let response = http()
        .post(first.url("/v1/chat/completions"))
        .bearer_auth(KEY_B)
        .json(&nth_body(0))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    let charged = reported_total(response).await.expect("complete");
    // Read from the running server's file (and its log) at once.
    assert_eq!(used_on_disk(&config), charged);

    let second = tokio::spawn({
        let config = config.clone();
        async move { Binary::start(&config).await }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !second.is_finished(),
        "the second server does not serve while the first holds the file"
    );
    assert!(first.terminate().await.success());
    let second = tokio::time::timeout(Duration::from_secs(30), second)
        .await
        .expect("the second server starts once the first is gone")
        .expect("join");
    assert!(
        !second.logged("another Iris is using this file").is_empty(),
        "it said why it waited"
    );
    assert_eq!(used_today(&second).await, charged);
}
