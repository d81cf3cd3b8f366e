//! Nothing leaks either way (issue 24, items 5 to 7), through the real
//! server: an upstream refusing Iris's credentials is Iris's own 502, its
//! body (which may echo the key) never the client's; the upstream's
//! session and server headers stay with Iris; the client's credentials and
//! address claims stay with Iris; answers are never sniffed, admin answers
//! never stored; the Responses API is refused at every path below it.

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{
    ADMIN_KEY, Iris, KEY_A, KEY_B, MockUpstream, admin_toml, base_config, chat_body, http,
    stream_body,
};

/// The key [`base_config`] gives the mock upstream.
const UPSTREAM_KEY: &str = "upstream-secret-key";

/// Everything a client got: the status, the head as text, the body.
async fn whole(response: reqwest::Response) -> (u16, String, String) {
    let status = response.status().as_u16();
    let head = format!("{:?}", response.headers());
    let body = response.text().await.expect("a body");
    (status, head, body)
}

#[tokio::test]
async fn an_upstream_refusing_iris_credentials_is_iris_502_without_its_body() {
    for status in ["401", "403"] {
        let upstream = MockUpstream::start().await;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("iris.db");
        let config = base_config(&upstream.base_url(), "").replace(
            "[store]\nkind = \"memory\"",
            &format!(
                "[store]\nkind = \"sqlite\"\npath = {:?}",
                db.display().to_string()
            ),
        );
        let iris = Iris::start(&config).await;
        let response = iris
            .chat(
                KEY_A,
                &chat_body("test-model"),
                &[("x-mock-echo-auth", status)],
            )
            .await;
        let (code, head, body) = whole(response).await;
        assert_eq!(code, 502, "{status}: {body}");
        let error: Value = serde_json::from_str(&body).expect("JSON");
        let error = &error["error"];
        assert_eq!(error["code"], "upstream_auth_failed", "{status}: {body}");
        assert_eq!(error["type"], "api_error");
        assert!(error["param"].is_null());
        let message = error["message"].as_str().unwrap();
        assert!(
            message.contains("`mock`") && message.contains("api_key"),
            "names the upstream and what to check: {message}"
        );
        for leaked in [UPSTREAM_KEY, "Bearer", "mock-session", "mock-upstream/1.0"] {
            assert!(
                !head.contains(leaked) && !body.contains(leaked),
                "{status}: {leaked} reached the client:\n{head}\n{body}"
            );
        }
        for header in ["set-cookie", "server", "alt-svc"] {
            assert!(!head.contains(&format!("\"{header}\"")), "{head}");
        }
        // The upstream did hand the key back, and 401/403 are still
        // retried (`retry_on`'s default), each attempt refused.
        let received = upstream.received();
        assert_eq!(received.len(), 3, "the first attempt and two retries");
        assert_eq!(
            received[0].headers["authorization"],
            format!("Bearer {UPSTREAM_KEY}")
        );
        iris.stop().await.unwrap();

        // The spend log has Iris's answer, not the upstream's.
        let db = rusqlite::Connection::open(&db).expect("open");
        let record: (u16, String, u32) = db
            .query_row(
                "SELECT status, error_code, attempts FROM spend_log WHERE client = 'a'",
                [],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
            )
            .expect("one record");
        assert_eq!(record, (502, "upstream_auth_failed".to_owned(), 3));
    }
}

#[tokio::test]
async fn the_upstream_session_and_server_headers_are_not_relayed() {
    let upstream = MockUpstream::start().await;
    let iris = Iris::start(&base_config(&upstream.base_url(), "")).await;
    let set = [
        ("x-mock-set-header", "set-cookie: session=abc; Path=/"),
        ("x-mock-set-header", "set-cookie2: old=style"),
        ("x-mock-set-header", "server: upstream-server/1.0"),
        ("x-mock-set-header", "alt-svc: h3=\":443\"; ma=86400"),
        ("x-mock-set-header", "connection: x-upstream-hop"),
        ("x-mock-set-header", "x-upstream-hop: 1"),
        ("x-mock-set-header", "x-kept: yes"),
    ];
    let error = [set.as_slice(), &[("x-mock-status", "422")]].concat();
    for (what, body, headers, status) in [
        ("a plain answer", chat_body("test-model"), &set[..], 200),
        ("a stream", stream_body("test-model"), &set[..], 200),
        (
            "an error passed through",
            chat_body("test-model"),
            &error[..],
            422,
        ),
    ] {
        let response = iris.chat(KEY_A, &body, headers).await;
        assert_eq!(response.status(), status, "{what}");
        let seen = response.headers();
        assert_eq!(seen["x-kept"], "yes", "{what}: other headers pass");
        for name in [
            "set-cookie",
            "set-cookie2",
            "server",
            "alt-svc",
            "x-upstream-hop",
        ] {
            assert!(seen.get(name).is_none(), "{what}: {name} relayed: {seen:?}");
        }
    }
}

#[tokio::test]
async fn the_key_iris_sent_is_blanked_out_of_errors_passed_through_and_of_any_header() {
    let upstream = MockUpstream::start().await;
    let iris = Iris::start(&base_config(&upstream.base_url(), "")).await;
    let blank = "*".repeat(UPSTREAM_KEY.len());
    // A careless provider's error, which hands back the key it was sent,
    // for a plain request and for a stream: passed through (not a 401 or
    // 403: those are Iris's 502), with the key blanked out.
    for (what, body) in [
        ("plain", chat_body("test-model")),
        ("stream", stream_body("test-model")),
    ] {
        for status in [400u16, 422, 429, 500] {
            let response = iris
                .chat(
                    KEY_A,
                    &body,
                    &[("x-mock-echo-auth", status.to_string().as_str())],
                )
                .await;
            let declared = response.content_length();
            let (code, head, text) = whole(response).await;
            assert_eq!(code, status, "{what} {status}: {text}");
            assert!(
                !head.contains(UPSTREAM_KEY) && !text.contains(UPSTREAM_KEY),
                "{what} {status}: the key reached the client:\n{head}\n{text}"
            );
            // The rest of the upstream's error is the client's, as sent.
            let error: Value = serde_json::from_str(&text).expect("the upstream's JSON");
            assert_eq!(error["error"]["code"], "invalid_api_key", "{text}");
            assert_eq!(error["error"]["received"]["api_key"], blank.as_str());
            assert_eq!(
                error["error"]["message"],
                format!("Incorrect API key provided. We received `Authorization: Bearer {blank}`.")
            );
            if let Some(declared) = declared {
                assert_eq!(
                    declared,
                    text.len() as u64,
                    "{what} {status}: the length still holds"
                );
            }
        }
    }
    // A header that holds it is not relayed, on a success or an error; the
    // others are.
    let echoed = format!("x-debug-auth: Bearer {UPSTREAM_KEY}");
    for extra in [None, Some(("x-mock-status", "422"))] {
        let mut headers = vec![
            ("x-mock-set-header", echoed.as_str()),
            ("x-mock-set-header", "x-kept: yes"),
        ];
        headers.extend(extra);
        let response = iris.chat(KEY_A, &chat_body("test-model"), &headers).await;
        let seen = response.headers().clone();
        let (_, head, _) = whole(response).await;
        assert_eq!(seen["x-kept"], "yes", "{extra:?}");
        assert!(seen.get("x-debug-auth").is_none(), "{extra:?}: {head}");
        assert!(!head.contains(UPSTREAM_KEY), "{extra:?}: {head}");
    }
}

/// An upstream `api_key` shorter than 8 characters is a placeholder (a
/// server that takes none), not searched for: searching for `x` would
/// drop `Content-Type: text/event-stream` and garble error bodies.
#[tokio::test]
async fn a_placeholder_upstream_key_is_not_searched_for() {
    let upstream = MockUpstream::start().await;
    let config = base_config(&upstream.base_url(), "")
        .replace(&format!("api_key = \"{UPSTREAM_KEY}\""), "api_key = \"x\"");
    assert!(config.contains("api_key = \"x\""), "{config}");
    let iris = Iris::start(&config).await;
    let response = iris.chat(KEY_A, &stream_body("test-model"), &[]).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let response = iris
        .chat(
            KEY_A,
            &chat_body("test-model"),
            &[("x-mock-echo-auth", "400")],
        )
        .await;
    let (status, _, body) = whole(response).await;
    assert_eq!(status, 400);
    let error: Value = serde_json::from_str(&body).expect("the upstream's JSON");
    assert_eq!(
        error["error"]["message"],
        "Incorrect API key provided. We received `Authorization: Bearer x`.",
        "passed through as sent"
    );
}

#[tokio::test]
async fn the_client_credentials_and_address_claims_are_not_forwarded() {
    let upstream = MockUpstream::start().await;
    let iris = Iris::start(&base_config(&upstream.base_url(), "")).await;
    let dropped = [
        // Keys in the places other APIs take them (the client's own Iris
        // key there is dropped too: below).
        ("x-api-key", "sk-ant-client-key".to_owned()),
        ("api-key", "azure-client-key".to_owned()),
        ("cookie", "session=client-session".to_owned()),
        ("proxy-authorization", "Basic dXNlcjpwYXNz".to_owned()),
        ("x-forwarded-for", "203.0.113.7".to_owned()),
        ("forwarded", "for=203.0.113.7;proto=https".to_owned()),
        ("x-real-ip", "203.0.113.7".to_owned()),
        ("x-forwarded-host", "client.example".to_owned()),
        ("x-forwarded-proto", "https".to_owned()),
        ("x-forwarded-port", "443".to_owned()),
        ("x-forwarded-prefix", "/other".to_owned()),
        ("true-client-ip", "203.0.113.7".to_owned()),
        ("cf-connecting-ip", "203.0.113.7".to_owned()),
        ("x-client-ip", "203.0.113.7".to_owned()),
        ("x-cluster-client-ip", "203.0.113.7".to_owned()),
        ("via", "1.1 client-proxy".to_owned()),
        // Other providers' keys.
        ("x-goog-api-key", "AIza-client-key".to_owned()),
        ("ocp-apim-subscription-key", "azure-subscription".to_owned()),
        ("x-amz-security-token", "aws-session-token".to_owned()),
        ("x-auth-token", "client-token".to_owned()),
        ("authentication", "Bearer client-token".to_owned()),
        // Another path or method than the one Iris calls.
        ("x-original-url", "/v1/admin".to_owned()),
        ("x-rewrite-url", "/v1/admin".to_owned()),
        ("x-http-method-override", "DELETE".to_owned()),
        // The body Iris sends is the one it read, never encoded.
        ("content-encoding", "gzip".to_owned()),
        // The client's key in a header Iris knows nothing of.
        ("x-my-gateway-auth", format!("token={KEY_A};v=1")),
        // ...and in one that holds the key and nothing else.
        ("x-my-key", KEY_A.to_owned()),
    ];
    let mut headers: Vec<(&str, &str)> = dropped
        .iter()
        .map(|(name, value)| (*name, value.as_str()))
        .collect();
    headers.push(("x-kept", "yes"));
    headers.push(("openai-organization", "org-kept"));
    // The client's `Host` names Iris; the upstream's names the upstream.
    headers.push(("host", "client.example"));
    let response = iris.chat(KEY_A, &chat_body("test-model"), &headers).await;
    assert_eq!(response.status(), 200);
    let seen = upstream.last().headers;
    for (name, _) in &dropped {
        assert!(seen.get(*name).is_none(), "{name} forwarded: {seen:?}");
    }
    assert_eq!(seen["x-kept"], "yes");
    assert_eq!(seen["openai-organization"], "org-kept");
    assert_eq!(seen["authorization"], format!("Bearer {UPSTREAM_KEY}"));
    let authority = upstream.base_url();
    let authority = authority
        .strip_prefix("http://")
        .and_then(|rest| rest.split('/').next())
        .expect("an http:// base URL");
    assert_eq!(seen.get_all("host").iter().collect::<Vec<_>>(), [authority]);
    assert!(
        !format!("{seen:?}").contains(KEY_A),
        "the client's key reached the upstream: {seen:?}"
    );
}

/// Two `Authorization` headers are no key, even when both are valid: which
/// one is meant is not clear, and a proxy in front that read the other
/// would have seen another client.
#[tokio::test]
async fn two_authorization_headers_are_no_key() {
    let upstream = MockUpstream::start().await;
    let iris = Iris::start(&base_config(&upstream.base_url(), "")).await;
    let response = http()
        .post(iris.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {KEY_A}"))
        .header("authorization", format!("Bearer {KEY_B}"))
        .json(&chat_body("test-model"))
        .send()
        .await
        .expect("an answer");
    let (status, _, body) = whole(response).await;
    assert_eq!(status, 401, "{body}");
    let error: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(error["error"]["code"], "invalid_api_key");
    assert_eq!(upstream.requests(), 0);
}

#[tokio::test]
async fn answers_are_never_sniffed_and_admin_answers_never_stored() {
    let upstream = MockUpstream::start().await;
    let config = base_config(&upstream.base_url(), &admin_toml()).replace(
        "shutdown_grace_ms = 2000",
        "shutdown_grace_ms = 2000\nmax_body_bytes = 4096",
    );
    let iris = Iris::start(&config).await;
    let client = http();
    let get = |path: &str, key: Option<&str>| {
        let request = client.get(iris.url(path));
        match key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    };
    let mut answers = vec![
        ("/v1/models", get("/v1/models", Some(KEY_A)).send().await),
        ("/v1/usage", get("/v1/usage", Some(KEY_A)).send().await),
        ("an error", get("/v1/nothing", None).send().await),
        ("401", get("/v1/models", Some("wrong")).send().await),
        ("/metrics", get("/metrics", None).send().await),
        ("/healthz", get("/healthz", None).send().await),
        (
            "a chat completion",
            Ok(iris.chat(KEY_A, &chat_body("test-model"), &[]).await),
        ),
        (
            "413",
            client
                .post(iris.url("/v1/chat/completions"))
                .bearer_auth(KEY_A)
                .body(vec![b' '; 5000])
                .send()
                .await,
        ),
    ];
    let created = client
        .post(iris.url("/admin/clients"))
        .bearer_auth(ADMIN_KEY)
        .json(&json!({"name": "fresh"}))
        .send()
        .await;
    let rotated = client
        .post(iris.url("/admin/clients/fresh/rotate"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await;
    let admin = vec![
        ("POST /admin/clients", created),
        ("POST /admin/clients/fresh/rotate", rotated),
        (
            "GET /admin/clients",
            get("/admin/clients", Some(ADMIN_KEY)).send().await,
        ),
        (
            "GET /admin/usage",
            get("/admin/usage?since=2026-01-01", Some(ADMIN_KEY))
                .send()
                .await,
        ),
        (
            "/admin with a wrong key",
            get("/admin/clients", Some("wrong")).send().await,
        ),
        (
            "an unknown /admin path",
            get("/admin/nothing", Some(ADMIN_KEY)).send().await,
        ),
    ];
    let admin_count = admin.len();
    answers.extend(admin);
    let total = answers.len();
    for (i, (what, response)) in answers.into_iter().enumerate() {
        let response = response.unwrap_or_else(|e| panic!("{what}: {e}"));
        let headers = response.headers();
        assert_eq!(
            headers.get("x-content-type-options").map(|v| v.as_bytes()),
            Some(&b"nosniff"[..]),
            "{what} ({}): {headers:?}",
            response.status()
        );
        let is_admin = i >= total - admin_count;
        let cache = headers.get("cache-control").map(|v| v.as_bytes());
        if is_admin {
            assert_eq!(cache, Some(&b"no-store"[..]), "{what}: {headers:?}");
        } else {
            assert_ne!(cache, Some(&b"no-store"[..]), "{what}: {headers:?}");
        }
        if what.starts_with("POST") {
            assert!(response.status().is_success(), "{what}");
            let body: Value = response.json().await.expect("json");
            assert!(body["key"].is_string(), "{what} hands out a key: {body}");
        }
    }
    // The console's assets keep their own policy: revalidated, not unstored.
    let page = get("/admin/ui", None).send().await.expect("console");
    assert_eq!(page.headers()["cache-control"], "no-cache");
    assert_eq!(page.headers()["x-content-type-options"], "nosniff");
}

#[tokio::test]
async fn the_responses_api_is_refused_at_every_path_below_it() {
    let upstream = MockUpstream::start().await;
    // Client b has a request budget to watch.
    let iris = Iris::start(&base_config(
        &upstream.base_url(),
        "[clients.budget]\nrequests_per_minute = 100\n",
    ))
    .await;
    let client = http();
    for path in [
        "/v1/responses",
        "/v1/responses/",
        "/v1/responses/x",
        "/v1/responses/x/",
        "/v1/responses/resp_1/input_items",
        "/v1/responses/a/b/c/d",
    ] {
        for method in [
            Method::POST,
            Method::GET,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
        ] {
            let response = client
                .request(method.clone(), iris.url(path))
                .bearer_auth(KEY_B)
                .json(&json!({"model": "other-model", "input": "hi"}))
                .send()
                .await
                .expect("an answer");
            let (status, _, body) = whole(response).await;
            assert_eq!(status, 400, "{method} {path}: {body}");
            let error: Value = serde_json::from_str(&body).expect("JSON");
            assert_eq!(
                error["error"]["code"], "unsupported_api",
                "{method} {path}: {body}"
            );
        }
    }
    assert_eq!(upstream.requests(), 0, "nothing sent upstream");
    assert_eq!(iris.used(KEY_B, "requests_per_minute").await, 0);
}
