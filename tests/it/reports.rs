//! Reports in money through the real server: each spend record's team,
//! cached and reasoning tokens and cost (to the millionth, in the SQLite
//! file and in PostgreSQL), and the cost per team as `GET
//! /admin/usage?by=team` and `iris usage --since … --by team` report it.

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::postgres::SharedPostgres;
use crate::support::{
    Iris, KEY_A, KEY_B, MockUpstream, admin_toml, eventually, iris_command, write_config,
};
use iris::keys::KeyHash;

const KEY_C: &str = "test-key-c";

/// 1000 prompt tokens (400 cached), 250 completion tokens (100 reasoning).
const USAGE: &str = concat!(
    r#"{"prompt_tokens": 1000, "completion_tokens": 250, "total_tokens": 1250, "#,
    r#""prompt_tokens_details": {"cached_tokens": 400}, "#,
    r#""completion_tokens_details": {"reasoning_tokens": 100}}"#
);

/// 1234 prompt tokens (567 cached), 89 completion tokens (13 reasoning):
/// on `vision`, 667 * 2.50 + 567 * 1.25 + 89 * 10.00 = 3266.25 per million
/// tokens, 0.003266 to the millionth (3266 micro-units).
const ODD_USAGE: &str = concat!(
    r#"{"prompt_tokens": 1234, "completion_tokens": 89, "total_tokens": 1323, "#,
    r#""prompt_tokens_details": {"cached_tokens": 567}, "#,
    r#""completion_tokens_details": {"reasoning_tokens": 13}}"#
);

/// The costs worked out by hand, in micro-units:
/// `USAGE` on `vision`: 600 * 2.50 + 400 * 1.25 + 250 * 10.00 = 4500;
/// `USAGE` on `small`: 600 * 0.10 + 400 * 0.05 + 250 * 0.40 = 180.
const VISION_USAGE: u64 = 4500;
const SMALL_USAGE: u64 = 180;
const VISION_ODD: u64 = 3266;
/// a: two `USAGE` on vision; b: one on small (both team research);
/// c: one `ODD_USAGE` on vision (team ops).
const RESEARCH: u64 = 2 * VISION_USAGE + SMALL_USAGE;
const OPS: u64 = VISION_ODD;

/// Models `vision` (2.50 / 1.25 / 10.00 per million tokens) and `small`
/// (0.10 / 0.05 / 0.40); clients a and b in team research, c in ops; the
/// admin key; `extra` (the store, the spend log, the currency) appended.
fn config(upstream: &str, extra: &str) -> String {
    let clients: String = [
        ("a", KEY_A, "research"),
        ("b", KEY_B, "research"),
        ("c", KEY_C, "ops"),
    ]
    .iter()
    .map(|(name, key, team)| {
        format!(
            "[[clients]]\nname = \"{name}\"\nkey = \"{}\"\nteam = \"{team}\"\n",
            KeyHash::of(key)
        )
    })
    .collect();
    format!(
        r#"
[server]
listen = "127.0.0.1:0"

[[upstreams]]
name = "mock"
base_url = "{upstream}"
api_key = "upstream-secret-key"

[[models]]
name = "vision"
upstream = "mock"
price = {{ input = 2.50, cached_input = 1.25, output = 10.00 }}

[[models]]
name = "small"
upstream = "mock"
price = {{ input = 0.10, cached_input = 0.05, output = 0.40 }}

[[teams]]
name = "research"

[[teams]]
name = "ops"

{clients}
{admin}
{extra}
"#,
        admin = admin_toml(),
    )
}

fn request(model: &str) -> Value {
    json!({"model": model, "max_tokens": 10,
           "messages": [{"role": "user", "content": "Say hello"}]})
}

/// The requests behind [`RESEARCH`] and [`OPS`], the last one streamed.
async fn spend(iris: &Iris) {
    for (key, model, usage) in [
        (KEY_A, "vision", USAGE),
        (KEY_A, "vision", USAGE),
        (KEY_B, "small", USAGE),
    ] {
        let response = iris
            .chat(key, &request(model), &[("x-mock-usage", usage)])
            .await;
        assert_eq!(response.status(), 200);
    }
    let mut stream = request("vision");
    stream["stream"] = json!(true);
    stream["stream_options"] = json!({"include_usage": true});
    let response = iris
        .chat(KEY_C, &stream, &[("x-mock-usage", ODD_USAGE)])
        .await;
    assert_eq!(response.status(), 200);
    let _ = response.text().await.expect("the stream, to its end");
}

/// `GET /admin/usage?since=0d&by=…`, once its records are all written.
async fn admin_usage(iris: &Iris, by: &str) -> Value {
    let path = format!("/admin/usage?since=0d&by={by}");
    let mut report = Value::Null;
    eventually(
        std::time::Duration::from_secs(10),
        "every record in the spend log",
        async || {
            let (status, answer) = iris.admin(Method::GET, &path, None).await;
            assert_eq!(status, 200, "{answer}");
            report = answer;
            report["total"]["requests"] == 4
        },
    )
    .await;
    report
}

fn micros(amount: &Value) -> u64 {
    let units = amount
        .as_f64()
        .unwrap_or_else(|| panic!("not an amount: {amount}"));
    (units * 1e6).round() as u64
}

/// Each row's group key and cost in micro-units (the JSON numbers are
/// currency units; one conversion, so equal to the millionth).
fn costs(report: &Value, key: &str) -> Vec<(String, u64)> {
    report["data"]
        .as_array()
        .unwrap_or_else(|| panic!("no rows: {report}"))
        .iter()
        .map(|row| {
            (
                row[key].as_str().unwrap_or("-").to_owned(),
                micros(&row["cost"]),
            )
        })
        .collect()
}

/// `iris usage` with `args`, its stdout (a failure fails the test).
fn usage_cli(config: &str, args: &[&str]) -> String {
    let file = write_config(config);
    let output = iris_command()
        .arg("usage")
        .args(args)
        .arg("--config")
        .arg(file.path())
        .output()
        .unwrap_or_else(|e| panic!("iris usage: {e}"));
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8")
}

/// What the server and the CLI report per team, checked against the costs
/// worked out by hand.
async fn check_reports(iris: &Iris, config: &str, currency: &str) {
    let by_team = admin_usage(iris, "team").await;
    assert_eq!(by_team["currency"], currency);
    assert_eq!(by_team["by"], json!(["team"]));
    assert_eq!(
        costs(&by_team, "team"),
        vec![("ops".into(), OPS), ("research".into(), RESEARCH)],
        "{by_team}"
    );
    let research = &by_team["data"][1];
    assert_eq!(research["requests"], 3);
    assert_eq!(research["prompt_tokens"], 3000);
    assert_eq!(research["completion_tokens"], 750);
    assert_eq!(research["total_tokens"], 3750);
    assert_eq!(micros(&by_team["total"]["cost"]), RESEARCH + OPS);

    let by_client = admin_usage(iris, "team,client,endpoint").await;
    assert_eq!(
        by_client["data"],
        json!([
            {"team": "ops", "client": "c", "endpoint": "chat", "requests": 1, "errors": 0,
             "prompt_tokens": 1234, "completion_tokens": 89, "total_tokens": 1323,
             "cost": 0.003266},
            {"team": "research", "client": "a", "endpoint": "chat", "requests": 2, "errors": 0,
             "prompt_tokens": 2000, "completion_tokens": 500, "total_tokens": 2500,
             "cost": 0.009},
            {"team": "research", "client": "b", "endpoint": "chat", "requests": 1, "errors": 0,
             "prompt_tokens": 1000, "completion_tokens": 250, "total_tokens": 1250,
             "cost": 0.00018},
        ])
    );

    // The CLI: only JSON on stdout, the same costs.
    let json: Value = serde_json::from_str(&usage_cli(
        config,
        &["--since", "0d", "--by", "team", "--format", "json"],
    ))
    .expect("only JSON on stdout");
    assert_eq!(json["currency"], currency);
    assert_eq!(
        costs(&json, "team"),
        vec![("ops".into(), OPS), ("research".into(), RESEARCH)],
        "{json}"
    );
    // The table: the currency in the header, amounts to the millionth.
    let table = usage_cli(config, &["--since", "0d", "--by", "team"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].ends_with(&format!("COST ({currency})")), "{table}");
    assert!(
        lines[1].starts_with("ops") && lines[1].ends_with(" 0.003266"),
        "{table}"
    );
    assert!(
        lines[2].starts_with("research") && lines[2].ends_with(" 0.00918"),
        "{table}"
    );
    assert!(
        lines[3].starts_with("TOTAL") && lines[3].ends_with(" 0.012446"),
        "{table}"
    );
    let csv = usage_cli(
        config,
        &["--since", "0d", "--by", "team", "--format", "csv"],
    );
    assert_eq!(
        csv.lines().next(),
        Some(
            format!(
                "TEAM,REQUESTS,ERRORS,PROMPT_TOKENS,COMPLETION_TOKENS,TOTAL_TOKENS,COST ({currency})"
            )
            .as_str()
        )
    );
}

/// The record of c's streamed request, as the database holds it: team,
/// cached and reasoning tokens, cost in micro-units, endpoint.
fn expected_record() -> Value {
    json!(["ops", 567, 13, VISION_ODD, "chat"])
}

const RECORD_SQL: &str = "SELECT team, cached_tokens, reasoning_tokens, cost_micros, endpoint FROM spend_log \
     WHERE client = 'c'";

#[tokio::test]
async fn records_and_reports_carry_cost_and_team_on_sqlite() {
    let upstream = MockUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("iris.db");
    let config = config(
        &upstream.base_url(),
        &format!(
            "[store]\nkind = \"sqlite\"\npath = {:?}\n[spend_log]\nflush_ms = 50\n",
            db.display().to_string()
        ),
    );
    let iris = Iris::start(&config).await;
    spend(&iris).await;
    check_reports(&iris, &config, "USD").await;

    let db = rusqlite::Connection::open(&db).expect("open");
    let record: Value = db
        .query_row(RECORD_SQL, [], |r| {
            Ok(json!([
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, String>(4)?
            ]))
        })
        .expect("c's record");
    assert_eq!(record, expected_record());
    // `cost`, in the currency, as the contract names the column.
    let cost: f64 = db
        .query_row("SELECT cost FROM spend_log WHERE client = 'c'", [], |r| {
            r.get(0)
        })
        .expect("cost");
    assert_eq!((cost * 1e6).round() as u64, VISION_ODD);
    iris.stop().await.expect("stop");
}

#[tokio::test]
async fn records_and_reports_carry_cost_and_team_on_postgres() {
    let Some(pg) = SharedPostgres::get().await else {
        return;
    };
    let upstream = MockUpstream::start().await;
    let config = config(
        &upstream.base_url(),
        &format!(
            "[pricing]\ncurrency = \"EUR\"\n[store]\nkind = \"memory\"\n\
             [spend_log]\nkind = \"postgres\"\nurl = \"{}\"\nflush_ms = 50\n{}",
            pg.url(),
            crate::support::own_spool()
        ),
    );
    let iris = Iris::start(&config).await;
    spend(&iris).await;
    check_reports(&iris, &config, "EUR").await;

    let row = pg
        .client()
        .await
        .query_one(RECORD_SQL, &[])
        .await
        .expect("c's record");
    let record = json!([
        row.get::<_, String>(0),
        row.get::<_, i64>(1),
        row.get::<_, i64>(2),
        row.get::<_, i64>(3),
        row.get::<_, String>(4)
    ]);
    assert_eq!(record, expected_record());
    // `cost`, in the currency, as the contract names the column.
    let cost: f64 = pg
        .client()
        .await
        .query_one("SELECT cost::float8 FROM spend_log WHERE client = 'c'", &[])
        .await
        .expect("cost")
        .get(0);
    assert_eq!((cost * 1e6).round() as u64, VISION_ODD);
    iris.stop().await.expect("stop");
}

/// The admin key is required, like every `/admin` path (a client's key
/// gets 401); the report names the currency even when nothing was spent.
#[tokio::test]
async fn an_empty_period_reports_zero_cost_in_the_currency() {
    let upstream = MockUpstream::start().await;
    let config = config(&upstream.base_url(), "[store]\nkind = \"memory\"\n");
    let iris = Iris::start(&config).await;
    let (status, report) = iris
        .admin(Method::GET, "/admin/usage?since=0d&by=team", None)
        .await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["currency"], "USD");
    assert_eq!(report["data"], json!([]));
    assert_eq!(report["total"]["cost"], 0.0);
    let refused = crate::support::http()
        .get(iris.url("/admin/usage?since=0d"))
        .bearer_auth(KEY_A)
        .send()
        .await
        .expect("answer");
    assert_eq!(refused.status(), 401);
}
