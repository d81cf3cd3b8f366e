//! The spend log end to end: a mixed run (plain, streamed, errors of Iris
//! and of the upstream, an interrupted stream) whose records total what the
//! mock upstream reported, as `iris usage --since` prints them from the
//! real binary; a sink that never answers leaves request latency alone and
//! counts what it drops; PostgreSQL through the binary too.

use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::support::postgres::SharedPostgres;
use crate::support::{
    App, Iris, KEY_A, KEY_B, MockUpstream, base_config, chat_body, http, iris_command, o200k,
    stream_body, write_config,
};

/// [`base_config`] with the budget store in `db` (so the spend log goes in
/// the same file), client `b` on a daily budget, and `extra` appended.
fn config(upstream: &str, db: &std::path::Path, extra: &str) -> String {
    base_config(
        upstream,
        &format!("[clients.budget]\ntokens_per_day = 1000000\n{extra}"),
    )
    .replace(
        "[store]\nkind = \"memory\"",
        &format!(
            "[store]\nkind = \"sqlite\"\npath = {:?}",
            db.display().to_string()
        ),
    )
}

fn usage_cli(config: &str, args: &[&str]) -> Output {
    let file = write_config(config);
    iris_command()
        .arg("usage")
        .args(args)
        .arg("--config")
        .arg(file.path())
        .output()
        .unwrap_or_else(|e| panic!("iris usage: {e}"))
}

fn usage_json(config: &str, args: &[&str]) -> Value {
    let output = usage_cli(config, &[args, &["--format", "json"]].concat());
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stdout)))
}

/// The `usage` object of a plain answer, or of a stream's usage chunk.
async fn reported_usage(response: reqwest::Response) -> (u64, u64) {
    let text = response.text().await.expect("body");
    let usage = if text.starts_with('{') {
        serde_json::from_str::<Value>(&text).expect("json")["usage"].clone()
    } else {
        text.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .find_map(|chunk| chunk.get("usage").filter(|u| !u.is_null()).cloned())
            .unwrap_or_else(|| panic!("no usage in {text}"))
    };
    (
        usage["prompt_tokens"].as_u64().expect("prompt_tokens"),
        usage["completion_tokens"]
            .as_u64()
            .expect("completion_tokens"),
    )
}

/// A client no token limit applies to has its prompt estimated without the
/// tokenizer; when the upstream cuts a stream before reporting usage, the
/// prompt is still charged (and logged) as the tokenizer counts it.
#[tokio::test]
async fn a_cut_stream_without_token_limits_is_charged_its_counted_prompt() {
    let upstream = MockUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(&upstream.base_url(), &dir.path().join("iris.db"), "");
    let iris = Iris::start(&config).await;

    let mut body = stream_body("test-model");
    body["messages"][0]["content"] =
        json!("Tell me, in as many words as you like, about tokenizers.");
    // Counted as OpenAI's tokenizer counts it; the rough figure (a token
    // per 4 bytes of the body) would be another number.
    let prompt = o200k::TELL_ME;
    let bytes = serde_json::to_vec(&body).expect("json").len();
    assert_ne!(
        prompt,
        bytes.div_ceil(4) as u64,
        "the test needs the rough figure to differ from the count"
    );
    let cut = iris.chat(KEY_A, &body, &[("x-mock-die-after", "2")]).await;
    let text = cut.text().await.unwrap_or_default();
    assert!(text.contains("upstream_stream_interrupted"), "{text}");
    iris.stop().await.expect("stop");

    let report = usage_json(&config, &["--since", "0d", "--by", "client"]);
    let row = &report["data"][0];
    assert_eq!(row["client"], "a", "{report}");
    assert_eq!(row["prompt_tokens"].as_u64(), Some(prompt), "{report}");
    assert_eq!(
        row["completion_tokens"].as_u64(),
        Some(o200k::WORDS[2]),
        "{report}"
    );
}

#[tokio::test]
async fn a_mixed_run_totals_what_the_upstream_reported() {
    let upstream = MockUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("iris.db");
    let config = config(&upstream.base_url(), &db, "");
    let iris = Iris::start(&config).await;

    // Client b: answers with usage, plain and streamed...
    let mut reported_b = (0, 0);
    let mut stream = stream_body("other-model");
    stream["stream_options"] = json!({"include_usage": true});
    for _ in 0..2 {
        for body in [&chat_body("other-model"), &stream] {
            let (p, c) = reported_usage(iris.chat(KEY_B, body, &[]).await).await;
            reported_b = (reported_b.0 + p, reported_b.1 + c);
        }
    }
    // ...an upstream error passed through (not retried), its code kept...
    let passed = iris
        .chat(
            KEY_B,
            &chat_body("other-model"),
            &[("x-mock-status", "400")],
        )
        .await;
    assert_eq!(passed.status(), 400);
    // ...Iris's own errors, after authentication...
    assert_eq!(
        iris.chat(KEY_B, &chat_body("test-model"), &[])
            .await
            .status(),
        403
    );
    let invalid = http()
        .post(iris.url("/v1/chat/completions"))
        .bearer_auth(KEY_B)
        .body("{not json")
        .send()
        .await
        .expect("send");
    assert_eq!(invalid.status(), 400);
    // ...and a stream the upstream cut after two chunks, which reported no
    // usage: charged the prompt estimate and the text counted.
    let cut_body = stream_body("other-model");
    let cut = iris
        .chat(KEY_B, &cut_body, &[("x-mock-die-after", "2")])
        .await;
    let cut_id = cut.headers()["x-request-id"]
        .to_str()
        .expect("id")
        .to_owned();
    let cut_text = cut.text().await.unwrap_or_default();
    assert!(
        cut_text.contains("upstream_stream_interrupted"),
        "{cut_text}"
    );
    // Client a: one answer on a renamed model, one unknown model; a bad key
    // is not a client and leaves no record.
    let reported_a = reported_usage(iris.chat(KEY_A, &chat_body("test-model"), &[]).await).await;
    assert_eq!(
        iris.chat(KEY_A, &chat_body("no-such-model"), &[])
            .await
            .status(),
        404
    );
    assert_eq!(
        iris.chat("wrong-key", &chat_body("test-model"), &[])
            .await
            .status(),
        401
    );

    iris.settled(KEY_B).await;
    let charged_b = iris.used(KEY_B, "tokens_per_day").await;
    iris.stop().await.expect("stop"); // the spend log's queue is written at shutdown

    let report = usage_json(&config, &["--since", "0d", "--by", "client"]);
    let rows = report["data"].as_array().expect("rows");
    assert_eq!(rows.len(), 2, "{report}");
    let (a, b) = (&rows[0], &rows[1]);
    assert_eq!(
        (a["client"].as_str(), b["client"].as_str()),
        (Some("a"), Some("b"))
    );
    assert_eq!(a["requests"], 2);
    assert_eq!(a["errors"], 1);
    assert_eq!(b["requests"], 8);
    assert_eq!(
        b["errors"], 4,
        "the 400 passed through, 403, 400 and the cut stream"
    );
    assert_eq!(
        b["total_tokens"].as_u64(),
        Some(charged_b),
        "the same tokens the budget was charged"
    );
    // The cut stream: its prompt and the two words it streamed, counted as
    // OpenAI's tokenizer counts them.
    let (cut_prompt, cut_completion) = (o200k::SAY_HELLO, o200k::WORDS[2]);
    assert_eq!(
        charged_b,
        reported_b.0 + reported_b.1 + cut_prompt + cut_completion
    );
    let total = &report["total"];
    assert_eq!(total["requests"], 10);
    assert_eq!(
        total["prompt_tokens"].as_u64(),
        Some(reported_a.0 + reported_b.0 + cut_prompt),
        "what the upstream reported, plus the cut stream's estimate"
    );
    assert_eq!(
        total["completion_tokens"].as_u64(),
        Some(reported_a.1 + reported_b.1 + cut_completion)
    );

    // The same report as a table and as CSV, grouped another way.
    let table = usage_cli(&config, &["--since", "0d", "--by", "model"]);
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("MODEL") && lines[0].ends_with("TOTAL_TOKENS  COST (USD)"),
        "{table}"
    );
    assert!(
        lines[1].starts_with("-  "),
        "requests without a model come first: {table}"
    );
    assert!(lines.last().unwrap().starts_with("TOTAL"), "{table}");
    let csv = usage_cli(
        &config,
        &["--since", "0d", "--client", "a", "--format", "csv"],
    );
    assert_eq!(
        String::from_utf8_lossy(&csv.stdout)
            .lines()
            .nth(1)
            .map(|l| l.split(',').next()),
        Some(Some("2")),
        "a's two requests, ungrouped"
    );

    // The records themselves.
    let db = rusqlite::Connection::open(&db).expect("open");
    let row = |sql: &str| -> Vec<Value> {
        let mut statement = db.prepare(sql).expect("sql");
        let width = statement.column_count();
        statement
            .query_map([], |r| {
                Ok((0..width)
                    .map(|i| match r.get_ref(i).expect("cell") {
                        rusqlite::types::ValueRef::Null => Value::Null,
                        rusqlite::types::ValueRef::Integer(n) => json!(n),
                        rusqlite::types::ValueRef::Text(t) => {
                            json!(String::from_utf8_lossy(t))
                        }
                        other => panic!("{other:?}"),
                    })
                    .collect::<Value>())
            })
            .expect("query")
            .map(|r| r.expect("row"))
            .collect()
    };
    let codes = row(
        "SELECT status, error_code, stream, attempts, ttfb_ms IS NOT NULL FROM spend_log \
         WHERE client = 'b' AND (status >= 400 OR error_code IS NOT NULL) ORDER BY status, error_code",
    );
    assert_eq!(
        codes,
        vec![
            json!([200, "upstream_stream_interrupted", 1, 1, 1]),
            json!([400, "invalid_request", 0, 0, 0]),
            json!([400, "mock_error", 0, 1, 1]),
            json!([403, "model_not_allowed", 0, 0, 0]),
        ]
    );
    let cut_row = row(&format!(
        "SELECT upstream, upstream_model, model FROM spend_log WHERE request_id = '{cut_id}'"
    ));
    assert_eq!(cut_row, vec![json!(["mock", "other-model", "other-model"])]);
    let renamed = row(
        "SELECT upstream_model, total_ms >= ttfb_ms FROM spend_log WHERE client = 'a' AND status = 200",
    );
    assert_eq!(renamed, vec![json!(["upstream-model", 1])]);
    let unknown = row("SELECT model, upstream FROM spend_log WHERE status = 404");
    assert_eq!(
        unknown,
        vec![json!([null, null])],
        "a made-up model name is not recorded"
    );
}

#[tokio::test]
async fn iris_usage_since_explains_what_it_cannot_do() {
    let upstream = MockUpstream::start().await;
    let memory = base_config(&upstream.base_url(), "");
    let output = usage_cli(&memory, &["--since", "0d"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("GET /admin/usage"), "{stderr}");

    let off = base_config(&upstream.base_url(), "[spend_log]\nkind = \"off\"");
    let stderr = String::from_utf8_lossy(&usage_cli(&off, &["--since", "0d"]).stderr).into_owned();
    assert!(stderr.contains("spend_log.kind = \"off\""), "{stderr}");

    let dir = tempfile::tempdir().expect("tempdir");
    let fresh = config(&upstream.base_url(), &dir.path().join("none.db"), "");
    let report = usage_json(&fresh, &["--since", "2025-01-01", "--until", "2025-02-01"]);
    assert_eq!(report["total"]["requests"], 0, "no file yet: nothing spent");
    assert_eq!(report["until"], "2025-02-01T00:00:00Z");
    assert!(
        !dir.path().join("none.db").exists(),
        "reading creates nothing"
    );

    let bad = usage_cli(&fresh, &["--since", "last tuesday"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--since: "));
    // Days ago beyond the calendar (years -9999 to 9999) are refused like
    // any other non-date; the count once overflowed (a panic in debug builds).
    let far = usage_cli(&fresh, &["--since", "9223372036854775807d"]);
    assert_eq!(far.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&far.stderr).contains("--since: "));
    let bad = usage_cli(&fresh, &["--since", "0d", "--by", "tenant"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--by: "));
    let no_since = usage_cli(&fresh, &["--by", "client"]);
    assert_eq!(no_since.status.code(), Some(2), "--by needs --since");
}

/// A PostgreSQL "server" that accepts connections and never answers.
async fn silent_postgres() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    format!("postgres://iris@{addr}/iris")
}

fn p50(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// A PostgreSQL that never answers: the records wait in the local spool
/// (committed before each response ends, like a SQLite log's), nothing is
/// dropped, and requests are not held up by the database.
#[tokio::test]
async fn a_postgres_that_never_answers_leaves_latency_alone_and_records_wait_in_the_spool() {
    let upstream = MockUpstream::start().await;
    upstream.state.keep_bodies(false);
    let dir = tempfile::tempdir().expect("tempdir");
    let dead = crate::support::state(&base_config(
        &upstream.base_url(),
        &format!(
            "[spend_log]\nkind = \"postgres\"\nurl = \"{}\"\nqueue_capacity = 16\nbatch_size = 1\n\
             spool_path = {:?}",
            silent_postgres().await,
            dir.path().join("spool.db").display().to_string()
        ),
    ))
    .await;
    let dead_log = dead.spend.clone();
    let dead = App::with_state(dead);
    let off = App::start(&base_config(
        &upstream.base_url(),
        "[spend_log]\nkind = \"off\"",
    ))
    .await;

    let body = chat_body("test-model");
    let timed = |samples: &mut Vec<Duration>, started: Instant, status: u16| {
        assert_eq!(status, 200);
        samples.push(started.elapsed());
    };
    for _ in 0..10 {
        dead.post_json("/v1/chat/completions", Some(KEY_A), &body)
            .await;
        off.post_json("/v1/chat/completions", Some(KEY_A), &body)
            .await;
    }
    let (mut with_dead, mut without) = (Vec::new(), Vec::new());
    for _ in 0..200 {
        let started = Instant::now();
        let status = dead
            .post_json("/v1/chat/completions", Some(KEY_A), &body)
            .await
            .status;
        timed(&mut with_dead, started, status);
        let started = Instant::now();
        let status = off
            .post_json("/v1/chat/completions", Some(KEY_A), &body)
            .await
            .status;
        timed(&mut without, started, status);
    }
    let (dead_p50, off_p50) = (p50(with_dead), p50(without));
    eprintln!("p50 with a silent PostgreSQL: {dead_p50:?}; with the spend log off: {off_p50:?}");
    assert!(
        dead_p50 <= off_p50 * 2 + Duration::from_millis(5),
        "a silent PostgreSQL slowed requests: p50 {dead_p50:?} against {off_p50:?}"
    );

    // 210 records, each committed to the spool before its response ended
    // (more than the 16 `queue_capacity` allows to wait for a commit):
    // none written, none lost.
    assert_eq!(dead_log.counts(), (0, 0));
    assert_eq!(dead_log.backlog().map(|(waiting, _)| waiting), Some(210));
    let ready = dead.get("/readyz", None).await;
    assert_eq!(ready.status, 200);
    assert!(
        ready
            .text()
            .starts_with("ready; spend spool: 210 records waiting for PostgreSQL"),
        "{}",
        ready.text()
    );
}

#[tokio::test]
async fn a_postgres_spend_log_through_the_binary() {
    let Some(pg) = SharedPostgres::get().await else {
        return;
    };
    let upstream = MockUpstream::start().await;
    let config = base_config(
        &upstream.base_url(),
        &format!(
            "[spend_log]\nkind = \"postgres\"\nurl = \"{}\"\n{}",
            pg.url(),
            crate::support::own_spool()
        ),
    );
    let iris = Iris::start(&config).await;
    let mut tokens = 0;
    for _ in 0..3 {
        let (p, c) = reported_usage(iris.chat(KEY_A, &chat_body("test-model"), &[]).await).await;
        tokens += p + c;
    }
    iris.stop().await.expect("stop");

    let report = usage_json(&config, &["--since", "1d", "--by", "model,upstream,day"]);
    let rows = report["data"].as_array().expect("rows");
    assert_eq!(rows.len(), 1, "{report}");
    assert_eq!(rows[0]["model"], "test-model");
    assert_eq!(rows[0]["upstream"], "mock");
    assert_eq!(
        rows[0]["day"].as_str().map(str::len),
        Some("2025-06-01".len())
    );
    assert_eq!(rows[0]["requests"], 3);
    assert_eq!(rows[0]["total_tokens"].as_u64(), Some(tokens));
    let stored: i64 = pg
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM spend_log WHERE upstream_model = 'upstream-model' \
             AND client_addr = '127.0.0.1'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(stored, 3);
}
