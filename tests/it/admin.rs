//! The admin API and managed clients (issue 12, items 1 to 3 and 6): `/admin/*`
//! absent without `[admin]` and closed to every key but the admin key; wrong
//! keys throttled per address; managed clients created, listed, changed,
//! disabled, rotated and deleted, taking effect within 2 s on every instance
//! (same process, another process on the same SQLite file, another instance
//! on the same Redis) and surviving a restart; every bad input refused by
//! name with nothing written, over the API and through `iris clients`.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Method, header};
use iris::keys::KeyHash;
use serde_json::{Value, json};

use crate::support::app::{Answer, to};
use crate::support::redis::{SharedRedis, with_store};
use crate::support::{
    ADMIN_KEY, App, Iris, KEY_A, KEY_B, MockUpstream, admin_toml, base_config, chat_body,
    eventually, iris_cli, ok, stderr, stdout, write_config,
};

/// How soon a change must take effect on every instance (issue 12, item 2).
const WITHIN: Duration = Duration::from_secs(2);

async fn admin_config() -> (MockUpstream, String) {
    let upstream = MockUpstream::start().await;
    let config = base_config(&upstream.base_url(), &admin_toml());
    (upstream, config)
}

/// `method path` on the in-process router with `key` and a JSON `body`.
async fn call(
    app: &App,
    key: Option<&str>,
    method: Method,
    path: &str,
    body: Option<&str>,
) -> Answer {
    let request = to(method, path, key).header(header::CONTENT_TYPE, "application/json");
    let body = body.map_or_else(Body::empty, |b| Body::from(b.to_owned()));
    app.send(request.body(body).unwrap()).await
}

/// [`call`] as the operator.
async fn admin(app: &App, method: Method, path: &str, body: Option<&str>) -> Answer {
    call(app, Some(ADMIN_KEY), method, path, body).await
}

/// Every client `GET /admin/clients` lists, as the in-process router says,
/// without the reset countdowns (which move while a test runs).
async fn list(app: &App) -> Value {
    let answer = admin(app, Method::GET, "/admin/clients", None).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let mut data = answer.json()["data"].clone();
    for client in data.as_array_mut().expect("a list") {
        for window in client["usage"].as_object_mut().expect("usage").values_mut() {
            window.as_object_mut().expect("a window").remove("reset_in");
        }
    }
    data
}

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .expect("a list")
        .iter()
        .map(|c| c["name"].as_str().expect("a name").to_owned())
        .collect()
}

// ---------------------------------------------------------------- 1. access

#[tokio::test]
async fn without_an_admin_section_every_admin_path_is_404_whatever_the_method_or_key() {
    let upstream = MockUpstream::start().await;
    let app = App::start(&base_config(&upstream.base_url(), "")).await;
    let paths = [
        "/admin",
        "/admin/",
        "/admin/clients",
        "/admin/clients/a",
        "/admin/clients/a/rotate",
        "/admin/clients/nobody/rotate",
        "/admin/reload",
        "/admin/usage",
        "/admin/ui",
        "/admin/ui/app.js",
        "/admin/ui/style.css",
        "/admin/ui/icon.svg",
        "/admin/no/such/thing",
    ];
    let methods = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
        Method::OPTIONS,
    ];
    for path in paths {
        for method in &methods {
            for key in [None, Some(KEY_A), Some(ADMIN_KEY), Some("wrong")] {
                let answer = call(&app, key, method.clone(), path, Some("{}")).await;
                assert_eq!(answer.status, 404, "{method} {path} with {key:?}");
                if method != Method::HEAD {
                    assert_eq!(answer.error()["code"], "not_found", "{method} {path}");
                }
            }
        }
    }
}

#[tokio::test]
async fn only_the_admin_key_opens_the_admin_api() {
    let (_upstream, config) = admin_config().await;
    for key in [None, Some(KEY_A), Some(KEY_B), Some("wrong"), Some("")] {
        // In-process every request comes from one address: a fresh app per
        // key keeps these 7 failures under the throttle's 20.
        let app = App::start(&config).await;
        for (method, path, body) in [
            (Method::GET, "/admin/clients", None),
            (
                Method::POST,
                "/admin/clients",
                Some(r#"{"name": "sneaky"}"#),
            ),
            (
                Method::PATCH,
                "/admin/clients/a",
                Some(r#"{"disabled": true}"#),
            ),
            (Method::DELETE, "/admin/clients/a", None),
            (Method::POST, "/admin/clients/a/rotate", None),
            (Method::POST, "/admin/reload", None),
            // an unknown path says nothing before the key is right
            (Method::GET, "/admin/no/such/thing", None),
        ] {
            let answer = call(&app, key, method.clone(), path, body).await;
            assert_eq!(answer.status, 401, "{method} {path} with {key:?}");
            assert_eq!(answer.error()["code"], "invalid_api_key");
        }
    }
    let app = App::start(&config).await;
    // Another scheme with the right key is not the admin key either.
    let basic = to(Method::GET, "/admin/clients", None)
        .header(header::AUTHORIZATION, format!("Basic {ADMIN_KEY}"))
        .body(Body::empty())
        .unwrap();
    assert_eq!(app.send(basic).await.status, 401);

    let answer = admin(&app, Method::GET, "/admin/clients", None).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.json()["object"], "list");
    assert_eq!(
        names(&answer.json()["data"]),
        ["a", "b"],
        "nothing was created"
    );
    let unknown = admin(&app, Method::GET, "/admin/no/such/thing", None).await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.error()["code"], "not_found");
    // The admin key is no client key.
    assert_eq!(app.get("/v1/models", Some(ADMIN_KEY)).await.status, 401);
    assert_eq!(app.get("/v1/models", Some(KEY_A)).await.status, 200);
}

// ---------------------------------------------------- 2. failed-auth throttle

#[tokio::test]
async fn twenty_wrong_keys_then_429_while_a_valid_key_from_the_same_address_passes_at_once() {
    let (_upstream, config) = admin_config().await;
    let iris = Iris::start(&config).await;
    for i in 0..20 {
        let response = iris
            .chat(&format!("wrong-key-{i}"), &chat_body("test-model"), &[])
            .await;
        assert_eq!(response.status(), 401, "wrong key {i}");
    }
    let response = iris
        .chat("wrong-key-20", &chat_body("test-model"), &[])
        .await;
    assert_eq!(response.status(), 429);
    let retry_after: u64 = response
        .headers()
        .get("retry-after")
        .expect("Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After in seconds");
    assert!((1..=6).contains(&retry_after), "Retry-After: {retry_after}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_auth_failures");
    // A missing key is a failure too, and a wrong admin key is throttled alike.
    assert_eq!(iris.status("/v1/models").await, 429);
    let (status, _) = iris
        .admin_as(Some("wrong"), reqwest::Method::GET, "/admin/clients", None)
        .await;
    assert_eq!(status, 429);

    // Valid keys from the same address are not slowed.
    let start = Instant::now();
    assert_eq!(iris.chat_status(KEY_A, "test-model").await, 200);
    assert_eq!(iris.chat_status(KEY_B, "other-model").await, 200);
    let (status, _) = iris
        .admin(reqwest::Method::GET, "/admin/clients", None)
        .await;
    assert_eq!(status, 200);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "valid keys took {:?}",
        start.elapsed()
    );
    // Another address has its own allowance.
    assert_eq!(
        iris.models_status_from("wrong", [127, 0, 0, 2].into())
            .await,
        401
    );
}

#[tokio::test]
async fn wrong_keys_on_the_admin_api_count_toward_the_same_throttle() {
    let (_upstream, config) = admin_config().await;
    let iris = Iris::start(&config).await;
    for i in 0..10 {
        let (status, _) = iris
            .admin_as(
                Some(&format!("wrong-admin-{i}")),
                reqwest::Method::GET,
                "/admin/clients",
                None,
            )
            .await;
        assert_eq!(status, 401);
    }
    for _ in 0..5 {
        // a client key is a wrong admin key
        let (status, _) = iris
            .admin_as(Some(KEY_A), reqwest::Method::POST, "/admin/reload", None)
            .await;
        assert_eq!(status, 401);
    }
    for _ in 0..5 {
        let (status, _) = iris
            .admin_as(None, reqwest::Method::DELETE, "/admin/clients/x", None)
            .await;
        assert_eq!(status, 401);
    }
    // Twenty failures on /admin: the client API is closed to guesses too.
    let response = iris
        .chat("wrong-client", &chat_body("test-model"), &[])
        .await;
    assert_eq!(response.status(), 429);
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(iris.chat_status(KEY_A, "test-model").await, 200);
}

// -------------------------------------------------- 3. managed clients, API

#[tokio::test]
async fn a_created_client_gets_its_key_once_and_uses_its_models_with_it() {
    let (upstream, config) = admin_config().await;
    let iris = Iris::start(&config).await;
    let (status, created) = iris
        .admin(
            reqwest::Method::POST,
            "/admin/clients",
            Some(r#"{"name": "team-x", "models": ["test-model"]}"#),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let key = created["key"].as_str().expect("the key").to_owned();
    assert!(key.starts_with("iris-") && key.len() > 40, "{key}");
    assert_eq!(created["client"]["name"], "team-x");
    assert_eq!(created["client"]["source"], "managed");
    assert_eq!(created["client"]["models"], json!(["test-model"]));
    assert_eq!(created["client"]["keys"], 1);

    let response = iris.chat(&key, &chat_body("test-model"), &[]).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "Hello from the mock upstream."
    );
    let received = upstream.received();
    let sent = received.last().expect("the upstream was called");
    assert_eq!(
        sent.headers["authorization"], "Bearer upstream-secret-key",
        "the upstream gets its own key"
    );
    let response = iris.chat(&key, &chat_body("other-model"), &[]).await;
    assert_eq!(response.status(), 403);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "model_not_allowed");

    let (status, list) = iris
        .admin(reqwest::Method::GET, "/admin/clients", None)
        .await;
    assert_eq!(status, 200);
    let text = list.to_string();
    let hash = KeyHash::of(&key).to_string();
    let hex = hash.trim_start_matches("sha256:");
    assert!(!text.contains(&key), "the key is listed: {text}");
    assert!(!text.contains(hex), "the key's hash is listed: {text}");
    let data = list["data"].as_array().unwrap();
    let sources: Vec<(&str, &str)> = data
        .iter()
        .map(|c| (c["name"].as_str().unwrap(), c["source"].as_str().unwrap()))
        .collect();
    assert_eq!(
        sources,
        [("a", "config"), ("b", "config"), ("team-x", "managed")]
    );
    for client in data {
        assert!(client.get("key").is_none(), "a key field: {client}");
    }
    let team = &data[2];
    assert_eq!(team["models"], json!(["test-model"]));
    assert_eq!(team["disabled"], false);
    assert!(team["usage"].is_object(), "{team}");
    assert_eq!(data[1]["models"], json!(["other-model"]));
}

#[tokio::test]
async fn taken_names_config_clients_and_unknown_clients_are_refused() {
    let (_upstream, config) = admin_config().await;
    let app = App::start(&config).await;
    let created = admin(
        &app,
        Method::POST,
        "/admin/clients",
        Some(r#"{"name": "dup"}"#),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.text());
    let first_key = created.json()["key"].as_str().unwrap().to_owned();
    for name in ["dup", "a", "b"] {
        let body = json!({"name": name}).to_string();
        let answer = admin(&app, Method::POST, "/admin/clients", Some(&body)).await;
        assert_eq!(answer.status, 409, "{name}: {}", answer.text());
        assert_eq!(answer.error()["code"], "client_exists");
        assert_eq!(answer.error()["param"], "name");
    }
    for name in ["a", "b"] {
        for (method, path, body) in [
            (
                Method::PATCH,
                format!("/admin/clients/{name}"),
                Some(r#"{"disabled": true}"#),
            ),
            (Method::POST, format!("/admin/clients/{name}/rotate"), None),
            (Method::DELETE, format!("/admin/clients/{name}"), None),
        ] {
            let answer = admin(&app, method.clone(), &path, body).await;
            assert_eq!(answer.status, 409, "{method} {path}: {}", answer.text());
            assert_eq!(answer.error()["code"], "client_managed_by_config");
        }
    }
    for (method, path, body) in [
        (
            Method::PATCH,
            "/admin/clients/ghost",
            Some(r#"{"disabled": true}"#),
        ),
        (Method::POST, "/admin/clients/ghost/rotate", None),
        (Method::DELETE, "/admin/clients/ghost", None),
    ] {
        let answer = admin(&app, method.clone(), path, body).await;
        assert_eq!(answer.status, 404, "{method} {path}: {}", answer.text());
        assert_eq!(answer.error()["code"], "client_not_found");
    }
    // Nothing of that changed anything.
    assert_eq!(names(&list(&app).await), ["a", "b", "dup"]);
    assert_eq!(app.get("/v1/models", Some(KEY_A)).await.status, 200);
    assert_eq!(app.get("/v1/models", Some(KEY_B)).await.status, 200);
    assert_eq!(app.get("/v1/models", Some(&first_key)).await.status, 200);
}

#[tokio::test]
async fn a_disabled_client_is_refused_within_two_seconds_and_enabling_restores_it() {
    let (_upstream, config) = admin_config().await;
    let iris = Iris::start(&config).await;
    let key = iris.create_client(r#"{"name": "team-d"}"#).await;
    assert_eq!(iris.chat_status(&key, "test-model").await, 200);

    let (status, answer) = iris
        .admin(
            reqwest::Method::PATCH,
            "/admin/clients/team-d",
            Some(r#"{"disabled": true}"#),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["client"]["disabled"], true);
    eventually(WITHIN, "the disabled key is refused", async || {
        iris.key_refused(&key).await
    })
    .await;
    assert_eq!(iris.chat_status(&key, "test-model").await, 401);
    assert_eq!(iris.listed("team-d").await.unwrap()["disabled"], true);

    let (status, answer) = iris
        .admin(
            reqwest::Method::PATCH,
            "/admin/clients/team-d",
            Some(r#"{"disabled": false}"#),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    eventually(WITHIN, "the enabled key works", async || {
        iris.key_works(&key).await
    })
    .await;
    assert_eq!(iris.chat_status(&key, "test-model").await, 200);
}

#[tokio::test]
async fn a_rotated_key_keeps_working_for_its_grace_then_only_the_new_one_does() {
    let (_upstream, config) = admin_config().await;
    let iris = Iris::start(&config).await;
    let old = iris.create_client(r#"{"name": "team-r"}"#).await;
    // Measured from before the request: the grace ends a whole number of
    // seconds after the rotation's own clock second, so at least 1 s after
    // this instant, and at most 2 s after the answer.
    let rotated_at = Instant::now();
    let (status, rotated) = iris
        .admin(
            reqwest::Method::POST,
            "/admin/clients/team-r/rotate",
            Some(r#"{"grace_s": 2}"#),
        )
        .await;
    assert_eq!(status, 200, "{rotated}");
    let new = rotated["key"].as_str().expect("a new key").to_owned();
    assert_ne!(new, old);
    assert_eq!(rotated["client"]["keys"], 2);
    assert_eq!(iris.chat_status(&old, "test-model").await, 200);
    assert_eq!(iris.chat_status(&new, "test-model").await, 200);

    let waited = eventually(
        Duration::from_secs(4),
        "the old key is refused after its grace",
        async || iris.key_refused(&old).await,
    )
    .await;
    let after = rotated_at.elapsed();
    assert!(
        after >= Duration::from_secs(1),
        "the old key stopped after {after:?} ({waited:?} polling), before its grace of 2 s"
    );
    assert_eq!(iris.chat_status(&new, "test-model").await, 200);
    assert_eq!(iris.listed("team-r").await.unwrap()["keys"], 1);

    // Without a grace, the old key stops at once.
    let (status, rotated) = iris
        .admin(reqwest::Method::POST, "/admin/clients/team-r/rotate", None)
        .await;
    assert_eq!(status, 200, "{rotated}");
    let newest = rotated["key"].as_str().unwrap();
    assert!(iris.key_refused(&new).await);
    assert_eq!(iris.chat_status(newest, "test-model").await, 200);
}

#[tokio::test]
async fn a_deleted_clients_key_stops_working() {
    let (_upstream, config) = admin_config().await;
    let iris = Iris::start(&config).await;
    let key = iris.create_client(r#"{"name": "team-gone"}"#).await;
    assert_eq!(iris.chat_status(&key, "test-model").await, 200);
    let (status, answer) = iris
        .admin(reqwest::Method::DELETE, "/admin/clients/team-gone", None)
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer, json!({"name": "team-gone", "deleted": true}));
    eventually(WITHIN, "the deleted key is refused", async || {
        iris.key_refused(&key).await
    })
    .await;
    assert!(iris.listed("team-gone").await.is_none());
    let (status, answer) = iris
        .admin(reqwest::Method::DELETE, "/admin/clients/team-gone", None)
        .await;
    assert_eq!(status, 404);
    assert_eq!(answer["error"]["code"], "client_not_found");
    // The name is free again, with a new key; the old one stays dead.
    let again = iris.create_client(r#"{"name": "team-gone"}"#).await;
    assert_ne!(again, key);
    assert_eq!(iris.chat_status(&again, "test-model").await, 200);
    assert_eq!(iris.chat_status(&key, "test-model").await, 401);
}

#[tokio::test]
async fn budgets_set_over_the_api_are_enforced_and_changed_by_patch() {
    let (_upstream, config) = admin_config().await;
    let iris = Iris::start(&config).await;
    let key = iris
        .create_client(r#"{"name": "small", "budget": {"tokens_per_day": 5}}"#)
        .await;
    let response = iris.chat(&key, &chat_body("test-model"), &[]).await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["x-should-retry"], "false");
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "insufficient_quota");

    let (status, answer) = iris
        .admin(
            reqwest::Method::PATCH,
            "/admin/clients/small",
            Some(r#"{"budget": {"tokens_per_day": 100000}}"#),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["client"]["budget"]["tokens_per_day"], 100000);
    assert_eq!(iris.chat_status(&key, "test-model").await, 200);
    iris.settled(&key).await;
    let listed = iris.listed("small").await.unwrap();
    assert_eq!(listed["usage"]["tokens_per_day"]["limit"], 100000);
    assert!(
        listed["usage"]["tokens_per_day"]["used"].as_u64().unwrap() > 0,
        "{listed}"
    );

    // A limit left out stays; a new one is enforced; null removes it.
    let (status, answer) = iris
        .admin(
            reqwest::Method::PATCH,
            "/admin/clients/small",
            Some(r#"{"budget": {"requests_per_minute": 1}}"#),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["client"]["budget"]["tokens_per_day"], 100000);
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(iris.chat_status(&key, "test-model").await);
    }
    assert!(
        statuses.contains(&429),
        "requests_per_minute = 1: {statuses:?}"
    );
    let (status, answer) = iris
        .admin(
            reqwest::Method::PATCH,
            "/admin/clients/small",
            Some(r#"{"budget": {"requests_per_minute": null}}"#),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["client"]["budget"]["requests_per_minute"],
        Value::Null
    );
    assert_eq!(iris.chat_status(&key, "test-model").await, 200);
}

// ------------------------------------------------------------ 4. bad input

/// Asserts a 400 `invalid_request` naming `param` (`None`: no field to name).
fn assert_refused(answer: &Answer, param: Option<&str>, what: &str) {
    assert_eq!(answer.status, 400, "{what}: {}", answer.text());
    let error = answer.error();
    assert_eq!(error["code"], "invalid_request", "{what}: {error}");
    assert_eq!(error["type"], "invalid_request_error", "{what}: {error}");
    match param {
        Some(param) => assert_eq!(error["param"], param, "{what}: {error}"),
        None => assert!(error["param"].is_null(), "{what}: {error}"),
    }
    assert!(
        !error["message"].as_str().unwrap_or("").is_empty(),
        "{what}: no message"
    );
}

const XSS: &str = "<img src=x onerror=alert(1)>";

#[tokio::test]
async fn bad_input_on_create_is_refused_by_name_and_writes_nothing() {
    let (_upstream, config) = admin_config().await;
    let app = App::start(&config).await;
    let before = list(&app).await;
    let long = "x".repeat(65);
    let cases: Vec<(String, Option<&str>)> = vec![
        (
            json!({"name": "x", "colour": "blue"}).to_string(),
            Some("colour"),
        ),
        (
            json!({"name": "x", "budget": {"tokens_per_day": -5}}).to_string(),
            Some("budget.tokens_per_day"),
        ),
        (
            json!({"name": "x", "budget": {"tokens_per_day": 0}}).to_string(),
            Some("budget.tokens_per_day"),
        ),
        (
            json!({"name": "x", "budget": {"requests_per_minute": -1}}).to_string(),
            Some("budget.requests_per_minute"),
        ),
        (
            json!({"name": "x", "budget": {"max_concurrent": 0}}).to_string(),
            Some("budget.max_concurrent"),
        ),
        (
            json!({"name": "x", "budget": {"tokens_per_month": "lots"}}).to_string(),
            Some("budget.tokens_per_month"),
        ),
        (
            json!({"name": "x", "budget": {"tokens_per_minute": 1.5}}).to_string(),
            Some("budget.tokens_per_minute"),
        ),
        (
            json!({"name": "x", "budget": {"tokenz_per_day": 5}}).to_string(),
            Some("budget.tokenz_per_day"),
        ),
        (
            json!({"name": "x", "budget": {"cost_per_day": -1.5}}).to_string(),
            Some("budget.cost_per_day"),
        ),
        (
            json!({"name": "x", "budget": {"cost_per_month": 0}}).to_string(),
            Some("budget.cost_per_month"),
        ),
        (
            json!({"name": "x", "budget": {"cost_per_month": "20"}}).to_string(),
            Some("budget.cost_per_month"),
        ),
        (
            json!({"name": "x", "budget": 5}).to_string(),
            Some("budget"),
        ),
        (
            json!({"name": "x", "models": ["test-model", "no-such-model"]}).to_string(),
            Some("models[1]"),
        ),
        (
            json!({"name": "x", "models": []}).to_string(),
            Some("models"),
        ),
        (
            json!({"name": "x", "models": "test-model"}).to_string(),
            Some("models"),
        ),
        (
            json!({"name": "x", "models": [7]}).to_string(),
            Some("models[0]"),
        ),
        (
            json!({"name": "x", "disabled": "yes"}).to_string(),
            Some("disabled"),
        ),
        (json!({"name": 42}).to_string(), Some("name")),
        (json!({"name": XSS}).to_string(), Some("name")),
        (json!({"name": ""}).to_string(), Some("name")),
        (json!({"name": "team x"}).to_string(), Some("name")),
        (json!({"name": "team/x"}).to_string(), Some("name")),
        // Path segments a browser resolves away: the console could not
        // reach such a client.
        (json!({"name": "."}).to_string(), Some("name")),
        (json!({"name": ".."}).to_string(), Some("name")),
        (json!({"name": "a%2Fb"}).to_string(), Some("name")),
        (json!({"name": " x"}).to_string(), Some("name")),
        (json!({"name": "x\n"}).to_string(), Some("name")),
        (json!({"name": long}).to_string(), Some("name")),
        (json!({"models": ["*"]}).to_string(), Some("name")),
        (r#"{"name": "x","#.to_owned(), None),
        ("not json".to_owned(), None),
        ("[]".to_owned(), None),
        // serde builds a struct from an array too: not a request
        ("[\"sneaky\"]".to_owned(), None),
        ("\"x\"".to_owned(), None),
        (String::new(), None),
    ];
    for (body, param) in &cases {
        let answer = admin(&app, Method::POST, "/admin/clients", Some(body)).await;
        assert_refused(&answer, *param, body);
        assert_eq!(list(&app).await, before, "{body} left something behind");
    }
    let answer = admin(
        &app,
        Method::POST,
        "/admin/clients",
        Some(&json!({"name": XSS}).to_string()),
    )
    .await;
    assert!(
        !answer.text().contains("<img"),
        "the refusal echoes the markup: {}",
        answer.text()
    );
    // The list above is this instance's index, reloaded after each change
    // it makes itself: a good create reloads it from the store, where a
    // half-written client would now show.
    let created = admin(
        &app,
        Method::POST,
        "/admin/clients",
        Some(r#"{"name": "ok"}"#),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.text());
    assert_eq!(names(&list(&app).await), ["a", "b", "ok"]);
}

#[tokio::test]
async fn bad_input_on_change_and_rotate_is_refused_by_name_and_changes_nothing() {
    let (_upstream, config) = admin_config().await;
    let app = App::start(&config).await;
    let created = admin(
        &app,
        Method::POST,
        "/admin/clients",
        Some(r#"{"name": "m", "models": ["other-model"], "budget": {"tokens_per_day": 1000}}"#),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.text());
    let key = created.json()["key"].as_str().unwrap().to_owned();
    let before = list(&app).await;
    let changes: Vec<(String, Option<&str>)> = vec![
        (json!({"colour": "blue"}).to_string(), Some("colour")),
        (json!({"name": "renamed"}).to_string(), Some("name")),
        (
            json!({"budget": {"tokens_per_day": -1}}).to_string(),
            Some("budget.tokens_per_day"),
        ),
        (
            json!({"budget": {"tokens_per_day": 0}}).to_string(),
            Some("budget.tokens_per_day"),
        ),
        (
            json!({"budget": {"tokens_per_day": "many"}}).to_string(),
            Some("budget.tokens_per_day"),
        ),
        (
            json!({"budget": {"per_day": 5}}).to_string(),
            Some("budget.per_day"),
        ),
        (json!({"models": ["nope"]}).to_string(), Some("models[0]")),
        (json!({"models": []}).to_string(), Some("models")),
        (json!({"models": {"a": 1}}).to_string(), Some("models")),
        (json!({"disabled": "true"}).to_string(), Some("disabled")),
        (json!({"disabled": 1}).to_string(), Some("disabled")),
        // valid models, bad budget: neither is written
        (
            json!({"models": ["test-model"], "budget": {"max_concurrent": -3}}).to_string(),
            Some("budget.max_concurrent"),
        ),
        (
            json!({"disabled": true, "models": ["ghost-model"]}).to_string(),
            Some("models[0]"),
        ),
        (r#"{"disabled": tru"#.to_owned(), None),
        (r#"{"disabled": true"#.to_owned(), None),
        // serde builds a struct from an array too: not a request
        ("[1, 2]".to_owned(), None),
        ("[]".to_owned(), None),
        ("[[\"test-model\"]]".to_owned(), None),
        ("null".to_owned(), None),
    ];
    for (body, param) in &changes {
        let answer = admin(&app, Method::PATCH, "/admin/clients/m", Some(body)).await;
        assert_refused(&answer, *param, body);
        assert_eq!(list(&app).await, before, "PATCH {body} changed something");
    }
    let rotations: Vec<(String, Option<&str>)> = vec![
        (json!({"grace_s": -1}).to_string(), Some("grace_s")),
        (json!({"grace_s": "2"}).to_string(), Some("grace_s")),
        (json!({"grace_s": 2.5}).to_string(), Some("grace_s")),
        (
            json!({"grace_s": 99_999_999_999_i64}).to_string(),
            Some("grace_s"),
        ),
        (json!({"grace": 2}).to_string(), Some("grace")),
        ("[5]".to_owned(), None),
        ("{".to_owned(), None),
    ];
    for (body, param) in &rotations {
        let answer = admin(&app, Method::POST, "/admin/clients/m/rotate", Some(body)).await;
        assert_refused(&answer, *param, body);
        assert_eq!(list(&app).await, before, "rotate {body} changed something");
    }
    // The list above is this instance's index, reloaded after each change
    // it makes itself: an empty change reloads it from the store, where
    // anything half-written would now show.
    let answer = admin(&app, Method::PATCH, "/admin/clients/m", Some("{}")).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(list(&app).await, before, "something was half-written");
    // The key was never rotated out.
    assert_eq!(app.get("/v1/models", Some(&key)).await.status, 200);
    let markup = admin(
        &app,
        Method::PATCH,
        &format!("/admin/clients/{}", urlencode(XSS)),
        Some(r#"{"disabled": true}"#),
    )
    .await;
    assert_eq!(markup.status, 404, "{}", markup.text());
    assert_eq!(markup.error()["code"], "client_not_found");
}

/// Percent-encodes every byte outside `[A-Za-z0-9]`.
fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

// ---------------------------------------------- 5. persistence and sharing

fn sqlite_config(upstream: &str, db: &Path) -> String {
    with_store(
        &base_config(upstream, &admin_toml()),
        &format!("[store]\nkind = \"sqlite\"\npath = \"{}\"\n", db.display()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_clients_in_sqlite_survive_a_restart() {
    let upstream = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = sqlite_config(&upstream.base_url(), &dir.path().join("iris.db"));
    let first = Iris::start(&config).await;
    let key = first
        .create_client(
            r#"{"name": "kept", "models": ["test-model"], "budget": {"tokens_per_day": 50000}}"#,
        )
        .await;
    let gone = first.create_client(r#"{"name": "gone"}"#).await;
    let (status, _) = first
        .admin(reqwest::Method::DELETE, "/admin/clients/gone", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(first.chat_status(&key, "test-model").await, 200);
    first.stop().await.unwrap();

    let second = Iris::start(&config).await;
    assert_eq!(second.chat_status(&key, "test-model").await, 200);
    assert_eq!(second.chat_status(&key, "other-model").await, 403);
    assert_eq!(second.chat_status(&gone, "test-model").await, 401);
    let listed = second.listed("kept").await.expect("still listed");
    assert_eq!(listed["source"], "managed");
    assert_eq!(listed["budget"]["tokens_per_day"], 50000);
    assert!(second.listed("gone").await.is_none());
    second.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_redis_see_each_others_clients_within_two_seconds() {
    let Some(redis) = SharedRedis::get().await else {
        return;
    };
    let (_upstream, config) = admin_config().await;
    let config = with_store(&config, &redis.store_toml(""));
    let a = Iris::start(&config).await;
    let b = Iris::start(&config).await;

    let key = a.create_client(r#"{"name": "shared"}"#).await;
    let took = eventually(WITHIN, "B knows the client created on A", async || {
        b.key_works(&key).await
    })
    .await;
    assert_eq!(b.chat_status(&key, "test-model").await, 200);
    assert!(b.listed("shared").await.is_some());
    eprintln!("created on A, working on B after {took:?}");

    let (status, _) = a
        .admin(
            reqwest::Method::PATCH,
            "/admin/clients/shared",
            Some(r#"{"disabled": true}"#),
        )
        .await;
    assert_eq!(status, 200);
    let took = eventually(WITHIN, "B refuses the client disabled on A", async || {
        b.key_refused(&key).await
    })
    .await;
    eprintln!("disabled on A, refused on B after {took:?}");

    let (status, _) = b
        .admin(
            reqwest::Method::PATCH,
            "/admin/clients/shared",
            Some(r#"{"disabled": false}"#),
        )
        .await;
    assert_eq!(status, 200);
    eventually(WITHIN, "A takes the client enabled on B", async || {
        a.key_works(&key).await
    })
    .await;

    let (status, rotated) = a
        .admin(reqwest::Method::POST, "/admin/clients/shared/rotate", None)
        .await;
    assert_eq!(status, 200);
    let new = rotated["key"].as_str().unwrap().to_owned();
    eventually(WITHIN, "B refuses the key rotated out on A", async || {
        b.key_refused(&key).await
    })
    .await;
    eventually(WITHIN, "B takes the new key", async || {
        b.key_works(&new).await
    })
    .await;

    let (status, _) = b
        .admin(reqwest::Method::DELETE, "/admin/clients/shared", None)
        .await;
    assert_eq!(status, 200);
    eventually(WITHIN, "A refuses the client deleted on B", async || {
        a.key_refused(&new).await
    })
    .await;
    // A name taken on one instance is taken on the other.
    let _ = a.create_client(r#"{"name": "once"}"#).await;
    let (status, answer) = b
        .admin(
            reqwest::Method::POST,
            "/admin/clients",
            Some(r#"{"name": "once"}"#),
        )
        .await;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(answer["error"]["code"], "client_exists");
}

// ------------------------------------------------------------------ 6. CLI

/// `iris clients ARGS --config CONFIG`, run off the async threads.
async fn clients(config: &Path, args: &[&str]) -> Output {
    iris_cli(config, &[&["clients"], args].concat()).await
}

/// The key a command printed on its `key:` line.
fn printed_key(output: &Output) -> String {
    ok(output)
        .lines()
        .find_map(|l| l.strip_prefix("key:"))
        .unwrap_or_else(|| panic!("no key in {}", stdout(output)))
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_changes_clients_under_a_running_server_within_two_seconds() {
    let upstream = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = sqlite_config(&upstream.base_url(), &dir.path().join("iris.db"));
    let file = write_config(&config);
    let iris = Iris::start(&config).await;

    let added = clients(
        file.path(),
        &[
            "add",
            "team-cli",
            "--models",
            "test-model",
            "--tokens-per-day",
            "100000",
        ],
    )
    .await;
    let key = printed_key(&added);
    eventually(
        WITHIN,
        "the server takes a client added by the CLI",
        async || iris.key_works(&key).await,
    )
    .await;
    assert_eq!(iris.chat_status(&key, "test-model").await, 200);
    assert_eq!(iris.chat_status(&key, "other-model").await, 403);
    let listed = iris.listed("team-cli").await.expect("listed by the server");
    assert_eq!(listed["budget"]["tokens_per_day"], 100000);

    let listing = clients(file.path(), &["list"]).await;
    assert!(listing.status.success(), "{}", stderr(&listing));
    let text = stdout(&listing);
    assert!(text.lines().any(|l| l.starts_with("a\tconfig")), "{text}");
    assert!(
        text.lines()
            .any(|l| l == "team-cli\tmanaged\ttest-model\tno"),
        "{text}"
    );
    assert!(!text.contains(&key), "list shows a key: {text}");

    let set = clients(file.path(), &["set", "team-cli", "--disable"]).await;
    assert!(set.status.success(), "{}", stderr(&set));
    eventually(
        WITHIN,
        "the server refuses a client disabled by the CLI",
        async || iris.key_refused(&key).await,
    )
    .await;
    assert!(
        stdout(&clients(file.path(), &["list"]).await)
            .contains("team-cli\tmanaged\ttest-model\tyes")
    );
    let set = clients(
        file.path(),
        &["set", "team-cli", "--enable", "--models", "*"],
    )
    .await;
    assert!(set.status.success(), "{}", stderr(&set));
    eventually(
        WITHIN,
        "the server takes the client enabled again",
        async || iris.key_works(&key).await,
    )
    .await;
    assert_eq!(
        iris.chat_status(&key, "other-model").await,
        200,
        "models changed"
    );

    let rotated = clients(file.path(), &["rotate", "team-cli"]).await;
    let new = printed_key(&rotated);
    assert_ne!(new, key);
    eventually(
        WITHIN,
        "the server refuses the key rotated out",
        async || iris.key_refused(&key).await,
    )
    .await;
    eventually(WITHIN, "the server takes the new key", async || {
        iris.key_works(&new).await
    })
    .await;

    let removed = clients(file.path(), &["remove", "team-cli"]).await;
    assert!(removed.status.success(), "{}", stderr(&removed));
    eventually(
        WITHIN,
        "the server refuses a client removed by the CLI",
        async || iris.key_refused(&new).await,
    )
    .await;
    assert!(iris.listed("team-cli").await.is_none());
    assert!(!stdout(&clients(file.path(), &["list"]).await).contains("team-cli"));
    iris.stop().await.unwrap();
}

/// `iris clients list` and `GET /admin/clients` show each client alike:
/// every model as `*`, the config's clients never disabled, a managed
/// client's models in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_and_the_admin_api_list_clients_alike() {
    let upstream = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = sqlite_config(&upstream.base_url(), &dir.path().join("iris.db"));
    let file = write_config(&config);
    let added = clients(
        file.path(),
        &["add", "both", "--models", "other-model,test-model"],
    )
    .await;
    printed_key(&added);
    let listing = clients(file.path(), &["list"]).await;
    assert!(listing.status.success(), "{}", stderr(&listing));
    assert_eq!(
        stdout(&listing),
        "NAME\tSOURCE\tMODELS\tDISABLED\n\
         a\tconfig\t*\tno\n\
         b\tconfig\tother-model\tno\n\
         both\tmanaged\tother-model,test-model\tno\n"
    );

    let iris = Iris::start_from_file(file.path()).await;
    let (status, list) = iris
        .admin(reqwest::Method::GET, "/admin/clients", None)
        .await;
    assert_eq!(status, 200, "{list}");
    let data = list["data"].as_array().expect("a list");
    let shown: Vec<Value> = data
        .iter()
        .map(|c| {
            let mut c = c.clone();
            let object = c.as_object_mut().expect("an object");
            object.remove("usage");
            if let Some(created) = object.remove("created_at") {
                assert!(
                    created.as_u64().is_some_and(|at| at > 1_700_000_000),
                    "{created}"
                );
            }
            c
        })
        .collect();
    let no_budget = json!({
        "requests_per_minute": null, "tokens_per_minute": null, "tokens_per_day": null,
        "tokens_per_month": null, "max_concurrent": null, "cost_per_day": null,
        "cost_per_month": null
    });
    assert_eq!(
        shown,
        [
            json!({"name": "a", "source": "config", "models": ["*"], "budget": no_budget, "disabled": false, "expires_at": null, "allowed_networks": []}),
            json!({"name": "b", "source": "config", "models": ["other-model"], "budget": no_budget, "disabled": false, "expires_at": null, "allowed_networks": []}),
            json!({"name": "both", "source": "managed", "models": ["other-model", "test-model"], "budget": no_budget, "disabled": false, "keys": 1, "expires_at": null, "allowed_networks": []}),
        ]
    );
    iris.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_on_the_cli_says_what_is_wrong_and_exits_1_writing_nothing() {
    let upstream = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = sqlite_config(&upstream.base_url(), &dir.path().join("iris.db"));
    let file = write_config(&config);
    let existing = clients(file.path(), &["add", "existing", "--models", "other-model"]).await;
    let existing_key = printed_key(&existing);
    let before = stdout(&clients(file.path(), &["list"]).await);

    let cases: &[(&[&str], &str)] = &[
        (&["add", XSS], "'name' must be"),
        (&["add", ""], "'name' must be"),
        (&["add", "."], "'name' must be"),
        (&["add", ".."], "'name' must be"),
        (
            &["add", "x", "--models", "test-model,no-such-model"],
            "no-such-model",
        ),
        (
            &["add", "x", "--tokens-per-day", "0"],
            "budget.tokens_per_day",
        ),
        (
            &["add", "x", "--tokens-per-day=-5"],
            "budget.tokens_per_day",
        ),
        (
            &["add", "x", "--tokens-per-day", "-5"],
            "budget.tokens_per_day",
        ),
        (&["rotate", "existing", "--grace-s", "-1"], "grace_s"),
        (
            &["add", "x", "--max-concurrent", "lots"],
            "--max-concurrent",
        ),
        (
            &["add", "x", "--requests-per-minute", "1.5"],
            "--requests-per-minute",
        ),
        (&["add", "a"], "exists already"),
        (&["add", "existing"], "exists already"),
        (&["set", "ghost", "--disable"], "no managed client"),
        (&["set", "a", "--disable"], "config file"),
        (&["set", "existing", "--models", "nope"], "nope"),
        (
            &["set", "existing", "--tokens-per-month", "-1"],
            "budget.tokens_per_month",
        ),
        (&["rotate", "ghost"], "no managed client"),
        (&["rotate", "b"], "config file"),
        (&["rotate", "existing", "--grace-s=-1"], "grace_s"),
        (&["remove", "ghost"], "no managed client"),
        (&["remove", "a"], "config file"),
    ];
    let mut wrong = Vec::new();
    for (args, says) in cases {
        let output = clients(file.path(), args).await;
        let message = stderr(&output);
        if output.status.code() != Some(1) || !message.contains(says) {
            wrong.push(format!(
                "iris clients {args:?}: exit {:?}, expected 1 and {says:?} in: {message}",
                output.status.code()
            ));
        }
        assert!(!stdout(&output).contains("key:"), "{args:?} printed a key");
    }
    // What clap refuses before Iris sees it (unknown flags, flags that
    // exclude each other, a value of the wrong type) is a usage error:
    // clap's message and exit 2, as for every other command.
    let usage: &[(&[&str], &str)] = &[
        (&["add", "x", "--colour", "blue"], "--colour"),
        (&["set", "existing", "--disable", "--enable"], "--enable"),
        (&["rotate", "existing", "--grace-s", "soon"], "--grace-s"),
        (&["add"], "<NAME>"),
    ];
    for (args, says) in usage {
        let output = clients(file.path(), args).await;
        let message = stderr(&output);
        if output.status.code() != Some(2) || !message.contains(says) {
            wrong.push(format!(
                "iris clients {args:?}: exit {:?}, expected 2 and {says:?} in: {message}",
                output.status.code()
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert_eq!(stdout(&clients(file.path(), &["list"]).await), before);

    // A config that is not there: a message and exit 1.
    let output = clients(&dir.path().join("missing.toml"), &["list"]).await;
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("iris clients"),
        "{}",
        stderr(&output)
    );

    // Nothing half-done: the existing client's key still works.
    let iris = Iris::start(&config).await;
    assert_eq!(iris.chat_status(&existing_key, "other-model").await, 200);
    iris.stop().await.unwrap();
}
