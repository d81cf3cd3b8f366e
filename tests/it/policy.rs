//! Key policy and client addresses (issue 21, items 1 to 3): a key that
//! expires (config and managed clients, without a reload), a key that works
//! only from its networks, and the client's address behind a trusted proxy
//! (`X-Forwarded-For` honoured only from one), which the failed-auth
//! throttle, `allowed_networks` and the spend record use.

use std::net::IpAddr;
use std::process::Output;
use std::time::Duration;

use iris::keys::KeyHash;
use serde_json::{Value, json};

use crate::support::{
    Iris, KEY_A, KEY_B, MockUpstream, admin_toml, base_config, chat_body, eventually, iris_command,
    write_config,
};

const KEY_C: &str = "test-key-c";

/// A third config client `c` with `policy` (TOML lines) and `server` lines
/// added to `[server]`, on [`base_config`] with the admin API.
fn config(upstream: &MockUpstream, server: &str, policy: &str) -> String {
    base_config(
        &upstream.base_url(),
        &format!(
            "{}\n[[clients]]\nname = \"c\"\nkey = \"{}\"\n{policy}\n",
            admin_toml(),
            KeyHash::of(KEY_C)
        ),
    )
    .replace("[server]\n", &format!("[server]\n{server}\n"))
}

/// `POST /v1/chat/completions` with `key`, from the loopback address
/// `source`, with `X-Forwarded-For: xff` when given: status and body.
async fn chat_from(iris: &Iris, key: &str, source: [u8; 4], xff: Option<&str>) -> (u16, Value) {
    let client = reqwest::Client::builder()
        .no_proxy()
        .local_address(IpAddr::from(source))
        .build()
        .unwrap();
    let mut request = client
        .post(iris.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&chat_body("test-model"));
    if let Some(xff) = xff {
        request = request.header("x-forwarded-for", xff);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

// ------------------------------------------------------------- 1. expiry

#[tokio::test]
async fn a_config_key_stops_working_when_it_expires_without_a_reload() {
    let upstream = MockUpstream::start().await;
    let now_ms = iris::spend::unix_ms(std::time::SystemTime::now());
    let at = jiff::Timestamp::from_millisecond(now_ms + 3000).unwrap();
    let iris = Iris::start(&config(&upstream, "", &format!("expires_at = \"{at}\""))).await;

    let (status, body) = chat_from(&iris, KEY_C, [127, 0, 0, 1], None).await;
    assert_eq!(status, 200, "before its expiry: {body}");
    eventually(Duration::from_secs(6), "key_expired", async || {
        let (status, body) = chat_from(&iris, KEY_C, [127, 0, 0, 1], None).await;
        assert!(status == 200 || status == 401, "{status}: {body}");
        status == 401
    })
    .await;
    let passed = iris::spend::unix_ms(std::time::SystemTime::now());
    assert!(passed >= now_ms + 3000, "refused before its time");
    let (status, body) = chat_from(&iris, KEY_C, [127, 0, 0, 1], None).await;
    assert_eq!((status, code(&body)), (401, "key_expired"), "{body}");
    assert_eq!(body["error"]["type"], "authentication_error");
    // Other keys are untouched; an expired key is not a guess: after more
    // than the throttle's 20 refusals it is still 401, not 429.
    for _ in 0..25 {
        let (status, _) = chat_from(&iris, KEY_C, [127, 0, 0, 1], None).await;
        assert_eq!(status, 401);
    }
    assert_eq!(iris.chat_status(KEY_A, "test-model").await, 200);
    // GET /admin/clients shows it.
    let listed = iris.listed("c").await.expect("listed");
    assert_eq!(listed["expires_at"], at.to_string(), "{listed}");
}

#[tokio::test]
async fn a_managed_client_created_with_a_past_expiry_gets_key_expired_until_it_is_lifted() {
    let upstream = MockUpstream::start().await;
    let iris = Iris::start(&config(&upstream, "", "")).await;
    let key = iris
        .create_client(r#"{"name": "contractor", "expires_at": "2020-01-01T01:00:00+01:00"}"#)
        .await;
    let (status, body) = chat_from(&iris, &key, [127, 0, 0, 1], None).await;
    assert_eq!((status, code(&body)), (401, "key_expired"), "{body}");
    let listed = iris.listed("contractor").await.expect("listed");
    assert_eq!(
        listed["expires_at"], "2020-01-01T00:00:00Z",
        "stored in UTC"
    );

    // Malformed: refused by name, nothing changed.
    let (status, answer) = iris
        .admin(
            reqwest::Method::PATCH,
            "/admin/clients/contractor",
            Some(r#"{"expires_at": "next tuesday"}"#),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["param"], "expires_at");
    let (status, answer) = iris
        .admin(
            reqwest::Method::PATCH,
            "/admin/clients/contractor",
            Some(r#"{"expires_at": "2027-01-01T00:00:00"}"#),
        )
        .await;
    assert_eq!(
        (status, &answer["error"]["param"]),
        (400, &json!("expires_at"))
    );
    assert_eq!(
        iris.listed("contractor").await.unwrap()["expires_at"],
        "2020-01-01T00:00:00Z"
    );

    // Moved into the future, then cleared with null: the key works again.
    let (status, answer) = iris
        .admin(
            reqwest::Method::PATCH,
            "/admin/clients/contractor",
            Some(r#"{"expires_at": "2999-01-01T00:00:00Z"}"#),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    eventually(Duration::from_secs(2), "the new expiry", async || {
        chat_from(&iris, &key, [127, 0, 0, 1], None).await.0 == 200
    })
    .await;
    let (status, _) = iris
        .admin(
            reqwest::Method::PATCH,
            "/admin/clients/contractor",
            Some(r#"{"expires_at": "2020-06-01T00:00:00Z"}"#),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(chat_from(&iris, &key, [127, 0, 0, 1], None).await.0, 401);
    let (status, answer) = iris
        .admin(
            reqwest::Method::PATCH,
            "/admin/clients/contractor",
            Some(r#"{"expires_at": null}"#),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(chat_from(&iris, &key, [127, 0, 0, 1], None).await.0, 200);
    assert_eq!(
        iris.listed("contractor").await.unwrap()["expires_at"],
        Value::Null
    );
}

// ----------------------------------------------------------- 2. networks

#[tokio::test]
async fn a_key_works_only_from_its_networks() {
    let upstream = MockUpstream::start().await;
    let iris = Iris::start(&config(
        &upstream,
        "",
        r#"allowed_networks = ["127.0.0.1/32", "2001:db8::/32"]
[[clients]]
name = "batch"
key = "KEY_D"
allowed_networks = ["10.0.0.0/8"]"#
            .replace("KEY_D", &KeyHash::of("test-key-d").to_string())
            .as_str(),
    ))
    .await;
    let (status, body) = chat_from(&iris, KEY_C, [127, 0, 0, 1], None).await;
    assert_eq!(status, 200, "inside 127.0.0.1/32: {body}");
    let (status, body) = chat_from(&iris, KEY_C, [127, 0, 0, 2], None).await;
    assert_eq!(
        (status, code(&body)),
        (403, "client_network_forbidden"),
        "{body}"
    );
    assert_eq!(body["error"]["type"], "permission_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("127.0.0.2"),
        "{body}"
    );
    let (status, body) = chat_from(&iris, "test-key-d", [127, 0, 0, 1], None).await;
    assert_eq!((status, code(&body)), (403, "client_network_forbidden"));
    // A client without the list is not affected.
    assert_eq!(chat_from(&iris, KEY_A, [127, 0, 0, 2], None).await.0, 200);
    assert_eq!(upstream.received().len(), 2, "refused requests go nowhere");

    // Managed clients take the field; a malformed CIDR is refused by name.
    let (status, answer) = iris
        .admin(
            reqwest::Method::POST,
            "/admin/clients",
            Some(r#"{"name": "m", "allowed_networks": ["127.0.0.0/8", "10.0.0.0/33"]}"#),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["param"], "allowed_networks[1]");
    assert!(iris.listed("m").await.is_none(), "nothing written");
    let key = iris
        .create_client(r#"{"name": "m", "allowed_networks": ["127.0.0.2", "::1/128"]}"#)
        .await;
    assert_eq!(
        iris.listed("m").await.unwrap()["allowed_networks"],
        json!(["127.0.0.2/32", "::1/128"])
    );
    assert_eq!(chat_from(&iris, &key, [127, 0, 0, 2], None).await.0, 200);
    assert_eq!(chat_from(&iris, &key, [127, 0, 0, 1], None).await.0, 403);
    let (status, _) = iris
        .admin(
            reqwest::Method::PATCH,
            "/admin/clients/m",
            Some(r#"{"allowed_networks": []}"#),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(chat_from(&iris, &key, [127, 0, 0, 1], None).await.0, 200);
}

// --------------------------------------------------- 3. trusted proxies

#[tokio::test]
async fn x_forwarded_for_counts_only_from_a_trusted_proxy() {
    let upstream = MockUpstream::start().await;
    let policy = r#"allowed_networks = ["203.0.113.0/24"]"#;
    let behind = Iris::start(&config(
        &upstream,
        r#"trusted_proxies = ["127.0.0.1/32"]"#,
        policy,
    ))
    .await;
    // From the trusted proxy: the forwarded address is the client's.
    let (status, body) = chat_from(&behind, KEY_C, [127, 0, 0, 1], Some("203.0.113.9")).await;
    assert_eq!(status, 200, "{body}");
    // A client's own entry left of the proxy's changes nothing.
    let (status, _) = chat_from(
        &behind,
        KEY_C,
        [127, 0, 0, 1],
        Some("203.0.113.9, 198.51.100.7"),
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = chat_from(
        &behind,
        KEY_C,
        [127, 0, 0, 1],
        Some("198.51.100.7, 203.0.113.9"),
    )
    .await;
    assert_eq!(status, 200);
    // No header: the proxy's own address.
    assert_eq!(chat_from(&behind, KEY_C, [127, 0, 0, 1], None).await.0, 403);
    // From a peer that is not a trusted proxy the header is ignored.
    let (status, body) = chat_from(&behind, KEY_C, [127, 0, 0, 2], Some("203.0.113.9")).await;
    assert_eq!((status, code(&body)), (403, "client_network_forbidden"));
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("127.0.0.2")
    );

    // Without trusted_proxies, the same header from the same peer is ignored.
    let direct = Iris::start(&config(&upstream, "", policy)).await;
    let (status, body) = chat_from(&direct, KEY_C, [127, 0, 0, 1], Some("203.0.113.9")).await;
    assert_eq!((status, code(&body)), (403, "client_network_forbidden"));
}

#[tokio::test]
async fn the_failed_auth_throttle_counts_the_forwarded_address() {
    let upstream = MockUpstream::start().await;
    let iris = Iris::start(&config(
        &upstream,
        r#"trusted_proxies = ["127.0.0.0/8"]"#,
        "",
    ))
    .await;
    let attacker = Some("198.51.100.66");
    for i in 0..20 {
        let (status, _) = chat_from(&iris, &format!("guess-{i}"), [127, 0, 0, 1], attacker).await;
        assert_eq!(status, 401, "guess {i}");
    }
    let (status, body) = chat_from(&iris, "guess-20", [127, 0, 0, 1], attacker).await;
    assert_eq!((status, code(&body)), (429, "too_many_auth_failures"));
    // Through another trusted proxy hop, the same client is the same address.
    let (status, _) = chat_from(
        &iris,
        "guess-21",
        [127, 0, 0, 2],
        Some("198.51.100.66, 127.0.0.9"),
    )
    .await;
    assert_eq!(status, 429);
    // Another client behind the same proxy has its own allowance.
    let neighbour = Some("198.51.100.67");
    let (status, _) = chat_from(&iris, "typo", [127, 0, 0, 1], neighbour).await;
    assert_eq!(status, 401, "not throttled for the attacker's guesses");
    let (status, _) = chat_from(&iris, KEY_B, [127, 0, 0, 1], neighbour).await;
    assert_eq!(status, 403, "b's key authenticates (test-model is not b's)");
    assert_eq!(
        chat_from(&iris, KEY_A, [127, 0, 0, 1], neighbour).await.0,
        200
    );
}

/// An IPv6 client counts as its /64: guesses from ever new addresses of
/// one block are throttled together; the next block is not.
#[tokio::test]
async fn the_failed_auth_throttle_counts_an_ipv6_client_as_its_slash_64() {
    let upstream = MockUpstream::start().await;
    let iris = Iris::start(&config(
        &upstream,
        r#"trusted_proxies = ["127.0.0.0/8"]"#,
        "",
    ))
    .await;
    for i in 0..20 {
        let address = format!("2001:db8:7:8::{:x}", i + 1);
        let (status, _) =
            chat_from(&iris, &format!("guess-{i}"), [127, 0, 0, 1], Some(&address)).await;
        assert_eq!(status, 401, "guess {i}");
    }
    let (status, body) = chat_from(
        &iris,
        "guess-20",
        [127, 0, 0, 1],
        Some("2001:db8:7:8:abcd::1"),
    )
    .await;
    assert_eq!((status, code(&body)), (429, "too_many_auth_failures"));
    let (status, _) = chat_from(&iris, "typo", [127, 0, 0, 1], Some("2001:db8:7:9::1")).await;
    assert_eq!(status, 401, "another /64 has its own allowance");
}

#[tokio::test]
async fn the_spend_record_holds_the_client_address() {
    let upstream = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("iris.db");
    let text = config(&upstream, r#"trusted_proxies = ["127.0.0.1/32"]"#, "").replace(
        "[store]\nkind = \"memory\"",
        &format!(
            "[store]\nkind = \"sqlite\"\npath = {:?}",
            db.display().to_string()
        ),
    );
    let iris = Iris::start(&text).await;
    assert_eq!(
        chat_from(&iris, KEY_A, [127, 0, 0, 1], Some("2001:db8::7"))
            .await
            .0,
        200
    );
    assert_eq!(
        chat_from(&iris, KEY_A, [127, 0, 0, 3], Some("2001:db8::7"))
            .await
            .0,
        200
    );
    iris.stop().await.unwrap();
    let db = rusqlite::Connection::open(&db).unwrap();
    let mut statement = db
        .prepare("SELECT client_addr FROM spend_log ORDER BY at, rowid")
        .unwrap();
    let addrs: Vec<Option<String>> = statement
        .query_map([], |row| row.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        addrs,
        [Some("2001:db8::7".to_owned()), Some("127.0.0.3".to_owned())]
    );
}

// ------------------------------------------------------------------ CLI

fn run(args: &[&str], config: &std::path::Path) -> Output {
    iris_command()
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap()
}

fn out(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test]
async fn iris_check_warns_of_an_expired_config_key_and_refuses_a_malformed_policy() {
    let upstream = MockUpstream::start().await;
    let past = write_config(&config(
        &upstream,
        "",
        r#"expires_at = "2020-01-01T00:00:00Z""#,
    ));
    let output = run(&["check"], past.path());
    assert!(output.status.success(), "{}", out(&output));
    assert!(
        out(&output).contains("warning: clients[2].expires_at: 2020-01-01T00:00:00Z is past"),
        "{}",
        out(&output)
    );
    let bad = write_config(&config(
        &upstream,
        r#"trusted_proxies = ["10.0.0.0/8", "proxy.internal"]"#,
        "expires_at = \"2027-02-30T00:00:00Z\"\nallowed_networks = [\"10.0.0.0\", \"10.0.0.0/40\"]",
    ));
    let output = run(&["check"], bad.path());
    assert_eq!(output.status.code(), Some(1), "{}", out(&output));
    for path in [
        "server.trusted_proxies[1]: ",
        "clients[2].expires_at: ",
        "clients[2].allowed_networks[1]: ",
    ] {
        assert!(out(&output).contains(path), "{path} in {}", out(&output));
    }
    assert!(
        !out(&output).contains("allowed_networks[0]"),
        "{}",
        out(&output)
    );
}

#[tokio::test]
async fn iris_clients_sets_and_clears_the_policy() {
    let upstream = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let text = config(&upstream, "", "").replace(
        "[store]\nkind = \"memory\"",
        &format!(
            "[store]\nkind = \"sqlite\"\npath = {:?}",
            dir.path().join("iris.db").display().to_string()
        ),
    );
    let file = write_config(&text);
    let output = run(
        &[
            "clients",
            "add",
            "ci",
            "--expires-at",
            "2020-01-01T00:00:00Z",
            "--allowed-networks",
            "127.0.0.1/32,::1",
        ],
        file.path(),
    );
    assert!(output.status.success(), "{}", out(&output));
    let key = String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("key:"))
        .unwrap()
        .trim()
        .to_owned();
    let iris = Iris::start(&text).await;
    let listed = iris.listed("ci").await.unwrap();
    assert_eq!(listed["expires_at"], "2020-01-01T00:00:00Z");
    assert_eq!(
        listed["allowed_networks"],
        json!(["127.0.0.1/32", "::1/128"])
    );
    assert_eq!(chat_from(&iris, &key, [127, 0, 0, 1], None).await.0, 401);

    let bad = run(
        &[
            "clients",
            "set",
            "ci",
            "--allowed-networks",
            "10.0.0.0/8,nope",
        ],
        file.path(),
    );
    assert_eq!(bad.status.code(), Some(1));
    assert!(out(&bad).contains("allowed_networks[1]"), "{}", out(&bad));
    let bad = run(
        &["clients", "set", "ci", "--expires-at", "soon"],
        file.path(),
    );
    assert_eq!(bad.status.code(), Some(1));
    assert!(out(&bad).contains("expires_at"), "{}", out(&bad));

    let output = run(
        &["clients", "set", "ci", "--expires-at", "none"],
        file.path(),
    );
    assert!(output.status.success(), "{}", out(&output));
    eventually(Duration::from_secs(3), "the expiry lifted", async || {
        chat_from(&iris, &key, [127, 0, 0, 1], None).await.0 == 200
    })
    .await;
    assert_eq!(chat_from(&iris, &key, [127, 0, 0, 2], None).await.0, 403);
    let output = run(
        &["clients", "set", "ci", "--allowed-networks", "none"],
        file.path(),
    );
    assert!(output.status.success(), "{}", out(&output));
    eventually(Duration::from_secs(3), "the networks lifted", async || {
        chat_from(&iris, &key, [127, 0, 0, 2], None).await.0 == 200
    })
    .await;
}
