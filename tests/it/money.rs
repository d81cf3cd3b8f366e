//! Money and teams through the real server: a request's cost from the
//! usage the answering deployment reported (cached and reasoning tokens
//! included), a deployment's price over its model's, cost windows spent,
//! and teams whose clients share one budget, reserved together with each
//! client's own windows, all or nothing, also under concurrency on SQLite
//! and Redis.

use std::sync::Arc;

use serde_json::{Value, json};

use crate::support::redis::SharedRedis;
use crate::support::{Iris, KEY_A, KEY_B, MockUpstream, o200k};
use iris::keys::KeyHash;

const KEY_C: &str = "test-key-c";

/// Usage as a provider reports it: 1000 prompt tokens of which 400 cached,
/// 250 completion tokens of which 100 reasoning.
/// (A header value: one line.)
const USAGE: &str = concat!(
    r#"{"prompt_tokens": 1000, "completion_tokens": 250, "total_tokens": 1250, "#,
    r#""prompt_tokens_details": {"cached_tokens": 400}, "#,
    r#""completion_tokens_details": {"reasoning_tokens": 100}}"#
);

/// `USAGE` at 2.50 / 1.25 / 10.00 per million tokens:
/// 600 * 2.50 + 400 * 1.25 + 250 * 10.00 = 4500 per million = 0.0045.
const USAGE_COST: f64 = 0.0045;

/// An upstream, a model `vision` priced 2.50 / 1.25 / 10.00 per million
/// tokens, clients a, b (team `research`) and c (team `ops`), the teams
/// with `team_budget`, every client with `client_budget`; `store` is the
/// `[store]` table (and anything after it).
fn config(upstream: &str, store: &str, client_budget: &str, team_budget: &str) -> String {
    let clients: String = [
        ("a", KEY_A, "research"),
        ("b", KEY_B, "research"),
        ("c", KEY_C, "ops"),
    ]
    .iter()
    .map(|(name, key, team)| {
        format!(
            "[[clients]]\nname = \"{name}\"\nkey = \"{}\"\nteam = \"{team}\"\n\
                 [clients.budget]\n{client_budget}\n",
            KeyHash::of(key)
        )
    })
    .collect();
    format!(
        r#"
[server]
listen = "127.0.0.1:0"

{store}

[[upstreams]]
name = "mock"
base_url = "{upstream}"
api_key = "upstream-secret-key"

[[models]]
name = "vision"
upstream = "mock"
price = {{ input = 2.50, cached_input = 1.25, output = 10.00 }}

[[teams]]
name = "research"
[teams.budget]
{team_budget}

[[teams]]
name = "ops"
[teams.budget]
{team_budget}

{clients}
"#
    )
}

const MEMORY: &str = "[store]\nkind = \"memory\"";

/// "Say hello" with a cap of 10 completion tokens: reserved at 9 prompt
/// tokens (o200k) and 10 completion tokens, 9 * 2.50 + 10 * 10.00 = 122.5
/// per million, 0.000123 to the millionth (rounded half up).
fn small_request() -> Value {
    json!({"model": "vision", "max_tokens": 10,
           "messages": [{"role": "user", "content": "Say hello"}]})
}
const SMALL_ESTIMATE: f64 = 0.000123;

async fn usage(iris: &Iris, key: &str) -> Value {
    iris.usage(key).await
}

fn money(value: &Value) -> f64 {
    value
        .as_f64()
        .unwrap_or_else(|| panic!("not an amount: {value}"))
}

/// Equal to the millionth.
fn assert_amount(actual: &Value, expected: f64, what: &str) {
    let actual = money(actual);
    assert!(
        (actual - expected).abs() < 5e-7,
        "{what}: {actual} where {expected} was expected"
    );
}

#[tokio::test]
async fn a_request_costs_its_usage_at_the_answering_deployments_prices() {
    assert_eq!(o200k::SAY_HELLO, 9, "the estimates below assume it");
    let upstream = MockUpstream::start().await;
    let iris = Iris::start(&config(
        &upstream.base_url(),
        MEMORY,
        "cost_per_day = 1.0",
        "cost_per_month = 100.0",
    ))
    .await;

    // Plain, then streamed with the same usage: each 0.0045, cached tokens
    // at their price and reasoning tokens priced once (inside completion).
    let response = iris
        .chat(KEY_A, &small_request(), &[("x-mock-usage", USAGE)])
        .await;
    assert_eq!(response.status(), 200);
    let mut stream = small_request();
    stream["stream"] = json!(true);
    stream["stream_options"] = json!({"include_usage": true});
    let response = iris.chat(KEY_A, &stream, &[("x-mock-usage", USAGE)]).await;
    assert_eq!(response.status(), 200);
    let _ = response.text().await.expect("the stream, to its end");
    iris.settled(KEY_A).await;

    let shown = usage(&iris, KEY_A).await;
    assert_eq!(shown["currency"], "USD");
    let day = &shown["windows"]["cost_per_day"];
    assert_amount(&day["used"], 2.0 * USAGE_COST, "the client's day");
    assert_amount(&day["limit"], 1.0, "the client's limit");
    assert_amount(&day["remaining"], 1.0 - 2.0 * USAGE_COST, "what remains");
    assert_eq!(shown["team"]["name"], "research");
    assert_amount(
        &shown["team"]["windows"]["cost_per_month"]["used"],
        2.0 * USAGE_COST,
        "the team's month",
    );
    // The tokens are the usage's, whatever the money.
    assert_eq!(shown["windows"]["tokens_per_day"]["used"], 2 * 1250);
}

#[tokio::test]
async fn a_deployments_price_wins_over_its_models() {
    let upstream = MockUpstream::start().await;
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[store]
kind = "memory"
[[upstreams]]
name = "mock"
base_url = "{}"
api_key = "upstream-secret-key"
[[models]]
name = "vision"
price = {{ input = 1.00, output = 1.00 }}
deployments = [
  {{ upstream = "mock", upstream_model = "dear", price = {{ input = 3.00, output = 5.00 }} }},
]
[[models]]
name = "small"
upstream = "mock"
price = {{ input = 1.00, output = 1.00 }}
[[clients]]
name = "a"
key = "{}"
[clients.budget]
cost_per_day = 1.0
"#,
        upstream.base_url(),
        KeyHash::of(KEY_A)
    );
    let iris = Iris::start(&config).await;
    let usage_1000_100 =
        r#"{"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100}"#;
    for model in ["vision", "small"] {
        let mut body = small_request();
        body["model"] = json!(model);
        let response = iris
            .chat(KEY_A, &body, &[("x-mock-usage", usage_1000_100)])
            .await;
        assert_eq!(response.status(), 200, "{model}");
    }
    iris.settled(KEY_A).await;
    // vision: 1000 * 3.00 + 100 * 5.00 = 3500 per million (its deployment's
    // price, cached_input defaulting to input); small: 1100 per million.
    assert_amount(
        &usage(&iris, KEY_A).await["windows"]["cost_per_day"]["used"],
        0.0035 + 0.0011,
        "the deployment's price for vision, the model's for small",
    );
}

#[tokio::test]
async fn a_spent_cost_window_is_refused_until_it_resets() {
    let upstream = MockUpstream::start().await;
    let iris = Iris::start(&config(
        &upstream.base_url(),
        MEMORY,
        "cost_per_day = 0.01",
        "cost_per_day = 100.0",
    ))
    .await;
    // Each request reserves 0.000123 and costs 0.0045: three are admitted
    // (0.009 + 0.000123 fits in 0.01), the third takes the day to 0.0135.
    for i in 0..3 {
        let response = iris
            .chat(KEY_A, &small_request(), &[("x-mock-usage", USAGE)])
            .await;
        assert_eq!(response.status(), 200, "request {i}");
        iris.settled(KEY_A).await;
    }
    let response = iris
        .chat(KEY_A, &small_request(), &[("x-mock-usage", USAGE)])
        .await;
    assert_eq!(response.status(), 429);
    let headers = response.headers().clone();
    assert_eq!(headers["x-should-retry"], "false");
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(
        (1..=86_400).contains(&retry_after),
        "until midnight UTC: {retry_after}"
    );
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["error"]["code"], "insufficient_quota", "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("cost_per_day") && message.contains("limit 0.01"),
        "{message}"
    );
    assert_eq!(upstream.requests(), 3, "the refused one never left");
}

#[tokio::test]
async fn a_teams_clients_spend_one_budget_and_another_team_is_its_own() {
    let upstream = MockUpstream::start().await;
    let iris = Iris::start(&config(
        &upstream.base_url(),
        MEMORY,
        "cost_per_day = 1.0",
        "cost_per_day = 0.01",
    ))
    .await;
    // a and b (research) take turns: 0.0045 each, the team's 0.01 spent
    // after the third.
    for key in [KEY_A, KEY_B, KEY_A] {
        let response = iris
            .chat(key, &small_request(), &[("x-mock-usage", USAGE)])
            .await;
        assert_eq!(response.status(), 200);
        iris.settled(key).await;
    }
    let before = usage(&iris, KEY_B).await;
    for key in [KEY_A, KEY_B] {
        let response = iris.chat(key, &small_request(), &[]).await;
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()["x-should-retry"], "false");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["error"]["code"], "insufficient_quota");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("team research") && message.contains("cost_per_day"),
            "the message names the team: {message}"
        );
    }
    // Refused by the team, b's own windows reserved nothing: not its
    // tokens, not its money, not a slot.
    let after = usage(&iris, KEY_B).await;
    let used = |shown: &Value| -> Vec<(String, Value)> {
        let windows = shown["windows"].as_object().expect("windows");
        windows
            .iter()
            .map(|(name, window)| (name.clone(), window["used"].clone()))
            .collect()
    };
    assert_eq!(used(&after), used(&before));
    assert_amount(
        &after["team"]["windows"]["cost_per_day"]["used"],
        3.0 * USAGE_COST,
        "the team's day",
    );
    // ops is another team: c is served.
    let response = iris
        .chat(KEY_C, &small_request(), &[("x-mock-usage", USAGE)])
        .await;
    assert_eq!(response.status(), 200);
    iris.settled(KEY_C).await;
    assert_eq!(usage(&iris, KEY_C).await["team"]["name"], "ops");
}

/// `sent` requests at once from the two members of research, each
/// reserving (and costing) 0.000123, against a team budget that fits
/// `fits` of them: admitted, and the team's day after they settled.
async fn concurrent_against_a_team(store: &str, sent: usize, fits: u64) -> (usize, f64) {
    let upstream = MockUpstream::start().await;
    let budget = format!("cost_per_day = {}", fits as f64 * SMALL_ESTIMATE);
    let iris = Arc::new(
        Iris::start(&config(
            &upstream.base_url(),
            store,
            "cost_per_day = 1.0",
            &budget,
        ))
        .await,
    );
    // The usage the estimate assumed: settling changes nothing.
    let exact = r#"{"prompt_tokens": 9, "completion_tokens": 10, "total_tokens": 19}"#;
    let mut tasks = Vec::new();
    for i in 0..sent {
        let iris = Arc::clone(&iris);
        tasks.push(tokio::spawn(async move {
            let key = if i % 2 == 0 { KEY_A } else { KEY_B };
            let response = iris
                .chat(
                    key,
                    &small_request(),
                    &[("x-mock-usage", exact), ("x-mock-delay-ms", "300")],
                )
                .await;
            response.status().as_u16()
        }));
    }
    let mut admitted = 0;
    for task in tasks {
        match task.await.unwrap() {
            200 => admitted += 1,
            429 => {}
            other => panic!("status {other}"),
        }
    }
    iris.settled(KEY_A).await;
    iris.settled(KEY_B).await;
    let spent = money(&usage(&iris, KEY_A).await["team"]["windows"]["cost_per_day"]["used"]);
    (admitted, spent)
}

#[tokio::test]
async fn concurrent_requests_never_overspend_a_team_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!(
        "[store]\nkind = \"sqlite\"\npath = \"{}\"",
        dir.path().join("iris.db").display()
    );
    let (admitted, spent) = concurrent_against_a_team(&store, 24, 5).await;
    println!("sqlite: sent 24, admitted {admitted}, budget 5 x 0.000123, spent {spent}");
    assert_eq!(admitted, 5, "the team's budget fits five, no more");
    assert_amount(&json!(spent), 5.0 * SMALL_ESTIMATE, "spent");
}

#[tokio::test]
async fn concurrent_requests_never_overspend_a_team_on_redis() {
    let Some(redis) = SharedRedis::get().await else {
        return;
    };
    let (admitted, spent) = concurrent_against_a_team(&redis.store_toml(""), 24, 5).await;
    println!("redis: sent 24, admitted {admitted}, budget 5 x 0.000123, spent {spent}");
    assert_eq!(admitted, 5, "the team's budget fits five, no more");
    assert_amount(&json!(spent), 5.0 * SMALL_ESTIMATE, "spent");
}

/// README.md's "Budgets in money and by team", run: its config (upstream
/// and keys aside), its requests with their usage, its figures.
#[tokio::test]
async fn the_readmes_worked_example_costs_what_the_readme_says() {
    let upstream = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[store]
kind = "sqlite"
path = "{}"
[spend_log]
flush_ms = 50
[pricing]
currency = "USD"
[[upstreams]]
name = "openai"
base_url = "{}"
api_key = "upstream-secret-key"
[[models]]
name = "vision"
upstream = "openai"
upstream_model = "gpt-4o"
price = {{ input = 2.50, cached_input = 1.25, output = 10.00 }}
[[models]]
name = "small"
upstream = "openai"
upstream_model = "gpt-4o-mini"
price = {{ input = 0.15, cached_input = 0.075, output = 0.60 }}
[[teams]]
name = "research"
[teams.budget]
cost_per_month = 500.0
[[teams]]
name = "ops"
[teams.budget]
cost_per_month = 100.0
[[clients]]
name = "notebook-1"
key = "{}"
team = "research"
[clients.budget]
cost_per_day = 20.0
[[clients]]
name = "notebook-2"
key = "{}"
team = "research"
[clients.budget]
cost_per_day = 20.0
[[clients]]
name = "batch"
key = "{}"
team = "ops"
"#,
        dir.path().join("iris.db").display(),
        upstream.base_url(),
        KeyHash::of(KEY_A),
        KeyHash::of(KEY_B),
        KeyHash::of(KEY_C)
    );
    let iris = Iris::start(&config).await;
    let usage_of = |prompt: u64, cached: u64, completion: u64| {
        format!(
            r#"{{"prompt_tokens": {prompt}, "completion_tokens": {completion}, "total_tokens": {}, "prompt_tokens_details": {{"cached_tokens": {cached}}}}}"#,
            prompt + completion
        )
    };
    let sent = [
        (KEY_A, "vision", 3, usage_of(1200, 0, 300)),
        (KEY_B, "small", 10, usage_of(2000, 1000, 500)),
        (KEY_C, "vision", 5, usage_of(800, 0, 200)),
    ];
    for (key, model, times, usage) in &sent {
        for _ in 0..*times {
            let body =
                json!({"model": model, "messages": [{"role": "user", "content": "Say hello"}]});
            let response = iris.chat(key, &body, &[("x-mock-usage", usage)]).await;
            assert_eq!(response.status(), 200);
        }
        iris.settled(key).await;
    }
    let month = |shown: &Value| shown["team"]["windows"]["cost_per_month"]["used"].clone();
    let research = usage(&iris, KEY_A).await;
    assert_amount(&month(&research), 0.02325, "research's month");
    assert_amount(
        &research["windows"]["cost_per_day"]["used"],
        0.018,
        "notebook-1's day",
    );
    assert_amount(
        &usage(&iris, KEY_B).await["windows"]["cost_per_day"]["used"],
        0.00525,
        "notebook-2's day",
    );
    assert_amount(&month(&usage(&iris, KEY_C).await), 0.020, "ops's month");
    println!(
        "README example: 18 requests sent; research expected 0.02325, reported {}; \
         ops expected 0.020, reported {}",
        month(&research),
        month(&usage(&iris, KEY_C).await)
    );

    // The operator's view: this month's spend per team, from the spend log.
    let file = crate::support::write_config(&config);
    crate::support::eventually(
        std::time::Duration::from_secs(10),
        "every record in the spend log",
        async || {
            let output = crate::support::iris_command()
                .args(["usage", "--since", "0d", "--by", "team", "--config"])
                .arg(file.path())
                .output()
                .expect("iris usage");
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .any(|line| line.split_whitespace().take(2).eq(["TOTAL", "18"]))
        },
    )
    .await;
    let output = crate::support::iris_command()
        .args(["usage", "--since", "0d", "--by", "team", "--config"])
        .arg(file.path())
        .output()
        .expect("iris usage");
    let table = String::from_utf8(output.stdout).expect("UTF-8");
    println!("{table}");
    let row = |team: &str| {
        table
            .lines()
            .find(|line| line.starts_with(team))
            .unwrap_or_else(|| panic!("no {team} row in\n{table}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        row("research")[1..],
        ["13", "0", "23600", "5900", "29500", "0.02325"]
    );
    assert_eq!(row("ops")[1..], ["5", "0", "4000", "1000", "5000", "0.02"]);
}

/// A stream cut before its usage (the upstream died mid-way) is charged
/// the money of what it generated, as its tokens are: never $0, never the
/// whole estimate.
#[tokio::test]
async fn a_stream_cut_before_its_usage_costs_what_it_generated() {
    let upstream = MockUpstream::start().await;
    let iris = Iris::start(&config(
        &upstream.base_url(),
        MEMORY,
        "cost_per_day = 1.0",
        "cost_per_day = 1.0",
    ))
    .await;
    let mut stream = small_request();
    stream["stream"] = json!(true);
    let response = iris
        .chat(KEY_A, &stream, &[("x-mock-die-after", "2")])
        .await;
    assert_eq!(response.status(), 200);
    let _ = response.text().await;
    iris.settled(KEY_A).await;
    let shown = usage(&iris, KEY_A).await;
    let spent = money(&shown["windows"]["cost_per_day"]["used"]);
    // The prompt alone (9 tokens at 2.50) is 0.000023; the estimate with
    // its whole cap 0.000123.
    assert!(
        spent > 0.000023 && spent < SMALL_ESTIMATE,
        "charged {spent} for two generated words"
    );
    assert_amount(
        &shown["team"]["windows"]["cost_per_day"]["used"],
        spent,
        "the team, the same",
    );
}
