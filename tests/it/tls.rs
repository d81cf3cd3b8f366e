//! Iris's own TLS connections, against servers whose certificates the tests
//! make: the PostgreSQL spend log (`sslmode`, `spend_log.ca_file`) on a
//! private PostgreSQL with `ssl = on`, and HTTPS upstreams
//! (`upstreams[].ca_file`).

use std::path::Path;
use std::time::Duration;

use crate::support::binary::Binary;
use crate::support::private_postgres::PrivatePostgres;
use crate::support::tls::TestCa;
use crate::support::{
    Iris, KEY_A, MockUpstream, base_config, chat_body, eventually, http, iris_cli, ok, stdout,
    write_config,
};

/// Generous, for a loaded two-core machine: each wait ends as soon as its
/// condition holds.
const WITHIN: Duration = Duration::from_secs(60);

/// `base_config` logging to PostgreSQL at `url`, with `ca_file` if given.
fn postgres_config(upstream: &str, url: &str, ca_file: Option<&Path>) -> String {
    let ca_file = ca_file
        .map(|path| format!("ca_file = \"{}\"\n", path.display()))
        .unwrap_or_default();
    base_config(
        upstream,
        &format!(
            "[spend_log]\nkind = \"postgres\"\nurl = \"{url}\"\nflush_ms = 50\n{ca_file}{}",
            crate::support::own_spool()
        ),
    )
}

/// Records in the private server's `spend_log`; `None` while the table does
/// not exist (Iris creates it on its first connection).
async fn records(pg: &PrivatePostgres) -> Option<i64> {
    let client = pg.client().await;
    let exists: bool = client
        .query_one("SELECT to_regclass('spend_log') IS NOT NULL", &[])
        .await
        .expect("look for the table")
        .get(0);
    if !exists {
        return None;
    }
    Some(
        client
            .query_one("SELECT count(*) FROM spend_log", &[])
            .await
            .expect("count records")
            .get(0),
    )
}

/// Iris's connections to the server (application name `iris`) that are
/// encrypted, and all of them.
async fn iris_connections(pg: &PrivatePostgres) -> (i64, i64) {
    let row = pg
        .client()
        .await
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FROM pg_stat_activity a \
             JOIN pg_stat_ssl s USING (pid) WHERE a.application_name = 'iris'",
            &[],
        )
        .await
        .expect("pg_stat_ssl");
    (row.get(0), row.get(1))
}

/// Sends `n` chat completions through `iris`, each answered 200.
async fn chats(iris: &Iris, n: usize) {
    for _ in 0..n {
        let response = iris.chat(KEY_A, &chat_body("test-model"), &[]).await;
        assert_eq!(response.status(), 200);
    }
}

#[tokio::test]
async fn postgres_over_tls_require_and_verify_full_with_the_ca_write_encrypted() {
    let ca = TestCa::new("Iris test database CA");
    let cert = ca.server_cert(&["127.0.0.1"]);
    let Some(pg) = PrivatePostgres::start_tls(&cert.cert_pem, &cert.key_pem).await else {
        return;
    };
    let upstream = MockUpstream::start().await;

    for (round, (sslmode, ca_file)) in [("require", None), ("verify-full", Some(ca.file()))]
        .into_iter()
        .enumerate()
    {
        let config = postgres_config(
            &upstream.base_url(),
            &pg.url(&format!("sslmode={sslmode}")),
            ca_file,
        );
        ok(&iris_cli(write_config(&config).path(), &["check"]).await);
        let iris = Iris::start(&config).await;
        chats(&iris, 2).await;
        let expected = 2 * (round as i64 + 1);
        eventually(WITHIN, &format!("{sslmode}: records written"), async || {
            records(&pg).await == Some(expected)
        })
        .await;
        // Iris keeps its connection open: it is there to look at.
        let (encrypted, all) = iris_connections(&pg).await;
        assert!(all >= 1, "{sslmode}: no connection of Iris's");
        assert_eq!(encrypted, all, "{sslmode}: a connection without TLS");
        iris.stop().await.expect("stop");
    }
}

#[tokio::test]
async fn verify_full_never_writes_to_a_server_whose_certificate_does_not_verify() {
    let ca = TestCa::new("Iris test database CA");
    let cert = ca.server_cert(&["127.0.0.1"]);
    let Some(pg) = PrivatePostgres::start_tls(&cert.cert_pem, &cert.key_pem).await else {
        return;
    };
    let upstream = MockUpstream::start().await;
    let port = pg.port;
    for (why, url, ca_file) in [
        // Signed by a CA neither the platform nor the config trusts.
        ("unknown issuer", pg.url("sslmode=verify-full"), None),
        // Trusted, but for another name: the certificate names only the
        // address 127.0.0.1, and Iris connects to `localhost`.
        (
            "name mismatch",
            format!("postgres://iris@localhost:{port}/postgres?sslmode=verify-full"),
            Some(ca.file()),
        ),
    ] {
        let config = postgres_config(&upstream.base_url(), &url, ca_file);
        // Neither `iris check` (which connects to nothing) nor the server
        // refuses to start: the records wait, the requests are served.
        ok(&iris_cli(write_config(&config).path(), &["check"]).await);
        // A process of its own: its log says why nothing was written.
        let iris = Binary::start(&config).await;
        for _ in 0..2 {
            let response = http()
                .post(iris.url("/v1/chat/completions"))
                .bearer_auth(KEY_A)
                .json(&chat_body("test-model"))
                .send()
                .await
                .expect("chat");
            assert_eq!(response.status(), 200);
        }
        eventually(WITHIN, &format!("{why}: a write refused"), async || {
            !iris.logged("invalid peer certificate").is_empty()
        })
        .await;
        assert_eq!(records(&pg).await, None, "{why}: Iris wrote to the server");
        assert_eq!(iris_connections(&pg).await.1, 0, "{why}: Iris is connected");
    }
}

#[tokio::test]
async fn check_names_sslmode_and_ca_file_problems_at_their_keys() {
    let ca = TestCa::new("Iris test database CA");
    let garbled =
        write_config("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n");
    let upstream = "http://127.0.0.1:1/v1";
    let url = |mode: &str| format!("postgres://iris:hunter2@db.internal/iris?sslmode={mode}");
    for (config, expected) in [
        (
            postgres_config(upstream, &url("verify-ca"), None),
            "spend_log.url: sslmode=verify-ca is not supported: use verify-full",
        ),
        (
            postgres_config(upstream, &url("bogus"), None),
            "spend_log.url: sslmode=bogus is not supported",
        ),
        (
            postgres_config(
                upstream,
                &url("verify-full"),
                Some(Path::new("/nonexistent/ca.pem")),
            ),
            "spend_log.ca_file: cannot read /nonexistent/ca.pem",
        ),
        (
            postgres_config(upstream, &url("verify-full"), Some(garbled.path())),
            "spend_log.ca_file: ",
        ),
        (
            postgres_config(upstream, &url("require"), Some(ca.file())),
            "spend_log.ca_file: only with sslmode=verify-full",
        ),
    ] {
        let output = iris_cli(write_config(&config).path(), &["check"]).await;
        let text = stdout(&output);
        assert_eq!(output.status.code(), Some(1), "{text}");
        assert!(
            text.lines().any(|line| line.starts_with(expected)),
            "missing {expected:?} in:\n{text}"
        );
        assert!(!text.contains("hunter2"), "{text}");
    }
}

/// A streamed chat through `iris` comes whole, to `data: [DONE]`.
async fn streams_to_its_end(iris: &Iris) {
    let streamed = iris
        .chat(KEY_A, &crate::support::stream_body("test-model"), &[])
        .await;
    assert_eq!(streamed.status(), 200);
    assert!(
        streamed
            .text()
            .await
            .expect("stream")
            .ends_with("data: [DONE]\n\n")
    );
}

/// `base_config` with `ca_file` on its upstream.
fn upstream_config(upstream: &str, ca_file: Option<&Path>) -> String {
    let config = base_config(upstream, "[routing]\nretries = 0\n");
    match ca_file {
        Some(path) => config.replace(
            "api_key = \"upstream-secret-key\"\n",
            &format!(
                "api_key = \"upstream-secret-key\"\nca_file = \"{}\"\n",
                path.display()
            ),
        ),
        None => config,
    }
}

#[tokio::test]
async fn an_https_upstream_behind_a_private_ca_answers_only_through_its_ca_file() {
    let ca = TestCa::new("Iris test upstream CA");
    let stranger = TestCa::new("Someone else's CA");
    let upstream =
        MockUpstream::start_tls(ca.server_cert(&["localhost", "127.0.0.1"]).server_config()).await;
    assert!(upstream.base_url().starts_with("https://127.0.0.1:"));

    let trusted = upstream_config(&upstream.base_url(), Some(ca.file()));
    ok(&iris_cli(write_config(&trusted).path(), &["check"]).await);
    let iris = Iris::start(&trusted).await;
    let response = iris.chat(KEY_A, &chat_body("test-model"), &[]).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-iris-upstream"], "mock");
    let body: serde_json::Value = response.json().await.expect("JSON");
    assert_eq!(body["object"], "chat.completion", "{body}");
    assert_eq!(upstream.requests(), 1);
    // Streamed, on the same pool.
    streams_to_its_end(&iris).await;
    assert_eq!(upstream.requests(), 2);
    iris.stop().await.expect("stop");

    // Without the CA, or with another one, the certificate is refused:
    // never an answer, and nothing reaches the upstream.
    for (why, ca_file) in [("no ca_file", None), ("another CA", Some(stranger.file()))] {
        let config = upstream_config(&upstream.base_url(), ca_file);
        let iris = Iris::start(&config).await;
        let response = iris.chat(KEY_A, &chat_body("test-model"), &[]).await;
        assert_eq!(response.status(), 502, "{why}");
        let body: serde_json::Value = response.json().await.expect("JSON");
        assert_eq!(
            body["error"]["code"], "upstream_unavailable",
            "{why}: {body}"
        );
        assert_eq!(
            upstream.requests(),
            2,
            "{why}: the upstream was sent a request"
        );
        iris.stop().await.expect("stop");
    }
}

/// An upstream whose TLS chooses HTTP/2 (ALPN) is spoken to in HTTP/2,
/// and answers and streams as over HTTP/1.1.
#[tokio::test]
async fn an_https_upstream_choosing_http2_is_spoken_to_in_http2() {
    let ca = TestCa::new("Iris test upstream CA");
    let upstream = MockUpstream::start_tls(
        ca.server_cert(&["localhost", "127.0.0.1"])
            .h2_server_config(),
    )
    .await;
    let iris = Iris::start(&upstream_config(&upstream.base_url(), Some(ca.file()))).await;
    for _ in 0..2 {
        let response = iris.chat(KEY_A, &chat_body("test-model"), &[]).await;
        assert_eq!(response.status(), 200);
        let body: serde_json::Value = response.json().await.expect("JSON");
        assert_eq!(body["object"], "chat.completion", "{body}");
    }
    streams_to_its_end(&iris).await;
    let received = upstream.received();
    assert_eq!(received.len(), 3);
    for request in &received {
        assert_eq!(request.version, http::Version::HTTP_2);
        // HTTP/2 names the host in `:authority`; a `Host` may repeat it.
        let host = request.headers.get("host").map(|h| h.to_str().unwrap());
        assert!(
            host.is_none_or(|host| upstream.base_url().contains(&format!("//{host}/"))),
            "{host:?}"
        );
    }
    iris.stop().await.expect("stop");
}

#[tokio::test]
async fn check_refuses_a_missing_or_unparsable_upstream_ca_file() {
    let ca = TestCa::new("Iris test upstream CA");
    let garbled =
        write_config("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n");
    let empty = write_config("");
    let https = "https://upstream.internal/v1";
    for (config, expected) in [
        (
            upstream_config(https, Some(Path::new("/nonexistent/ca.pem"))),
            "upstreams[0].ca_file: cannot read /nonexistent/ca.pem",
        ),
        (
            upstream_config(https, Some(garbled.path())),
            "upstreams[0].ca_file: ",
        ),
        (
            upstream_config(https, Some(empty.path())),
            "upstreams[0].ca_file: ",
        ),
        (
            upstream_config("http://upstream.internal/v1", Some(ca.file())),
            "upstreams[0].ca_file: only with an https:// base_url",
        ),
    ] {
        let output = iris_cli(write_config(&config).path(), &["check"]).await;
        let text = stdout(&output);
        assert_eq!(output.status.code(), Some(1), "{text}");
        assert!(
            text.lines().any(|line| line.starts_with(expected)),
            "missing {expected:?} in:\n{text}"
        );
    }
    ok(&iris_cli(
        write_config(&upstream_config(https, Some(ca.file()))).path(),
        &["check"],
    )
    .await);
}
