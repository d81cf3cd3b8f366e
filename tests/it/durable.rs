//! The spend log loses nothing (docs/durability.md): the real `iris` binary
//! killed with `kill -9` under load, then restarted; every response a client
//! received whole has exactly one record. With the SQLite store (the record
//! rides in the settlement's transaction), with a SQLite log of its own
//! file, with PostgreSQL (records go through the local spool), and with
//! PostgreSQL unreachable for the whole run (the spool drains after the
//! restart); a spool past its bound counts and logs what it drops.
//!
//! A batch sent to PostgreSQL twice (a crash between sending and deleting
//! it from the spool) landing once is `spend::tests::a_batch_sent_again_after_a_crash_lands_once`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::task::JoinHandle;

use crate::support::binary::Binary;
use crate::support::postgres::SharedPostgres;
use crate::support::redis::with_store;
use crate::support::{KEY_A, MockUpstream, base_config, chat_body, eventually, http, stream_body};

/// Clients sending requests without pause, each keeping the request id of
/// every response it received whole.
struct Load {
    stop: Arc<AtomicBool>,
    whole: Arc<AtomicUsize>,
    workers: Vec<JoinHandle<Vec<String>>>,
}

impl Load {
    /// `workers` clients at once; every other request streamed (asking for
    /// its usage).
    fn start(url: String, workers: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let whole = Arc::new(AtomicUsize::new(0));
        let client = http();
        let workers = (0..workers)
            .map(|worker| {
                let (stop, whole, client, url) =
                    (stop.clone(), whole.clone(), client.clone(), url.clone());
                tokio::spawn(async move {
                    let mut received = Vec::new();
                    let mut i = worker;
                    while !stop.load(Ordering::SeqCst) {
                        i += 1;
                        let body = if i % 2 == 0 {
                            chat_body("test-model")
                        } else {
                            let mut body = stream_body("test-model");
                            body["stream_options"] = json!({"include_usage": true});
                            body
                        };
                        let Ok(response) = client
                            .post(&url)
                            .bearer_auth(KEY_A)
                            .json(&body)
                            .send()
                            .await
                        else {
                            break; // the server is gone
                        };
                        if let Some(id) = received_whole(response).await {
                            received.push(id);
                            whole.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    received
                })
            })
            .collect();
        Self {
            stop,
            whole,
            workers,
        }
    }

    /// Waits until `n` responses came whole (the load is under way).
    async fn until_whole(&self, n: usize) {
        let whole = self.whole.clone();
        eventually(
            Duration::from_secs(60),
            "responses received whole",
            async || whole.load(Ordering::SeqCst) >= n,
        )
        .await;
    }

    /// Stops the clients: the request ids of every response received whole.
    async fn received(self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        let mut ids = Vec::new();
        for worker in self.workers {
            ids.extend(worker.await.expect("worker"));
        }
        ids
    }
}

/// The request id of a 200 whose body came whole: a JSON body with its
/// usage, or a stream to its `[DONE]`.
async fn received_whole(response: reqwest::Response) -> Option<String> {
    if response.status() != 200 {
        return None;
    }
    let id = response
        .headers()
        .get("x-request-id")?
        .to_str()
        .ok()?
        .to_owned();
    let text = response.text().await.ok()?;
    let whole = if text.starts_with('{') {
        serde_json::from_str::<Value>(&text).is_ok_and(|body| body["usage"].is_object())
    } else {
        text.ends_with("data: [DONE]\n\n")
    };
    whole.then_some(id)
}

/// Every id `received` has exactly one record in `records` (request id →
/// how many), and no record is there twice.
fn exactly_once(received: &[String], records: &HashMap<String, i64>) {
    assert!(!received.is_empty());
    let missing: Vec<&String> = received
        .iter()
        .filter(|id| !records.contains_key(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} responses received whole have no record: {missing:?}",
        missing.len(),
        received.len()
    );
    let twice: Vec<_> = records.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "records kept twice: {twice:?}");
    eprintln!(
        "kill -9 under load: {} responses received whole, each with its record ({} records)",
        received.len(),
        records.len()
    );
}

/// Request id → records, from a SQLite spend log.
fn sqlite_records(db: &Path) -> HashMap<String, i64> {
    let db = rusqlite::Connection::open(db).expect("open");
    let mut statement = db
        .prepare("SELECT request_id, count(*) FROM spend_log GROUP BY request_id")
        .expect("sql");
    statement
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .expect("query")
        .map(|row| row.expect("row"))
        .collect()
}

/// Request id → records, from PostgreSQL.
async fn postgres_records(pg: &SharedPostgres) -> HashMap<String, i64> {
    pg.client()
        .await
        .query(
            "SELECT request_id, count(*) FROM spend_log GROUP BY request_id",
            &[],
        )
        .await
        .expect("query")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// Runs the load on `iris` until 60 responses came whole, kills it with
/// `kill -9` while the clients are still sending, and returns what they
/// received whole.
async fn kill_under_load(iris: &mut Binary) -> Vec<String> {
    let load = Load::start(iris.url("/v1/chat/completions"), 8);
    load.until_whole(60).await;
    iris.kill9();
    load.received().await
}

/// The SQLite store, the spend log in its file: each record rides in its
/// settlement's transaction. Before, records were written behind, once a
/// second, and a `kill -9` lost the last second's (all 40 in
/// `faults::kill_9_loses_no_charge_of_a_complete_response`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_under_load_keeps_every_record_with_the_sqlite_store() {
    let upstream = MockUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("iris.db");
    let config = with_store(
        &base_config(&upstream.base_url(), ""),
        &format!(
            "[store]\nkind = \"sqlite\"\npath = {:?}\n",
            db.display().to_string()
        ),
    );
    let mut iris = Binary::start(&config).await;
    let received = kill_under_load(&mut iris).await;
    // A restart on the file serves; what it holds is what the crash left.
    let iris = Binary::start(&config).await;
    exactly_once(&received, &sqlite_records(&db));
    drop(iris);
}

/// The memory store and a SQLite log in a file of its own
/// (`spend_log.path`): the log commits the records itself, and a response
/// waits for that commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_under_load_keeps_every_record_in_a_log_of_its_own_file() {
    let upstream = MockUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("spend.db");
    let config = base_config(
        &upstream.base_url(),
        &format!("[spend_log]\npath = {:?}", log.display().to_string()),
    );
    let mut iris = Binary::start(&config).await;
    let received = kill_under_load(&mut iris).await;
    exactly_once(&received, &sqlite_records(&log));
}

/// Waits until `iris` has shipped its whole spool to PostgreSQL.
async fn spool_drained(iris: &Binary) {
    let url = iris.url("/readyz");
    eventually(Duration::from_secs(60), "the spool drained", async || {
        let body = http()
            .get(&url)
            .send()
            .await
            .expect("readyz")
            .text()
            .await
            .expect("body");
        body.contains("spend spool: 0 records waiting")
    })
    .await;
}

/// PostgreSQL answering, the SQLite store: the spool is a table in the
/// store's file, written in the settlement's transaction. What the crash
/// left unsent goes first after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_under_load_with_postgres_keeps_every_record_through_the_spool() {
    let Some(pg) = SharedPostgres::get().await else {
        return;
    };
    let upstream = MockUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("iris.db");
    let config = with_store(
        &base_config(
            &upstream.base_url(),
            &format!("[spend_log]\nkind = \"postgres\"\nurl = \"{}\"", pg.url()),
        ),
        &format!(
            "[store]\nkind = \"sqlite\"\npath = {:?}\n",
            db.display().to_string()
        ),
    );
    let mut iris = Binary::start(&config).await;
    let received = kill_under_load(&mut iris).await;
    let iris = Binary::start(&config).await;
    spool_drained(&iris).await;
    exactly_once(&received, &postgres_records(&pg).await);
}

/// A URL where nothing listens: PostgreSQL down.
async fn closed_port_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    format!("postgres://iris@{addr}/iris")
}

/// PostgreSQL unreachable for the whole run, the memory store, no spool
/// configured: the records wait in `iris-spool.db` in the working
/// directory, survive the `kill -9`, and reach PostgreSQL once, after a
/// restart that finds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_with_postgres_down_keeps_every_record_until_it_is_back() {
    let Some(pg) = SharedPostgres::get().await else {
        return;
    };
    let upstream = MockUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let spend_log = |url: &str| {
        base_config(
            &upstream.base_url(),
            &format!("[spend_log]\nkind = \"postgres\"\nurl = \"{url}\""),
        )
    };
    let mut iris = Binary::start_in(&spend_log(&closed_port_url().await), dir.path()).await;
    let received = kill_under_load(&mut iris).await;
    let spool = dir.path().join("iris-spool.db");
    let spooled: i64 = rusqlite::Connection::open(&spool)
        .expect("the spool, in the working directory")
        .query_row("SELECT count(*) FROM spend_spool", [], |row| row.get(0))
        .expect("count");
    assert!(spooled as usize >= received.len(), "{spooled} spooled");

    let iris = Binary::start_in(&spend_log(&pg.url()), dir.path()).await;
    spool_drained(&iris).await;
    assert_eq!(
        iris.logged("records left in the spool go to PostgreSQL first")[0]["records"],
        spooled
    );
    exactly_once(&received, &postgres_records(&pg).await);
}

/// A spool past `spool_max_records` drops what does not fit: counted by
/// reason, logged as an error, never silently.
#[tokio::test]
async fn a_full_spool_counts_and_logs_what_it_drops() {
    let upstream = MockUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = base_config(
        &upstream.base_url(),
        &format!(
            "[spend_log]\nkind = \"postgres\"\nurl = \"{}\"\nspool_max_records = 3\nspool_path = {:?}",
            closed_port_url().await,
            dir.path().join("spool.db").display().to_string()
        ),
    );
    let iris = Binary::start(&config).await;
    let client = http();
    for _ in 0..5 {
        let response = client
            .post(iris.url("/v1/chat/completions"))
            .bearer_auth(KEY_A)
            .json(&chat_body("test-model"))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200, "a full spool fails no request");
        response.text().await.expect("the whole body");
    }
    let metrics = client
        .get(iris.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let sum = |name, labels: &[&str]| crate::support::metric_sum(&metrics, name, labels);
    assert_eq!(
        sum("iris_spend_log_dropped_total", &["reason=\"spool_full\""]),
        2.0,
        "{metrics}"
    );
    assert_eq!(sum("iris_spend_spool_records", &[]), 3.0, "{metrics}");
    let errors = iris.logged("the spool is full");
    assert_eq!(errors[0]["level"], "ERROR", "{errors:?}");
    assert_eq!(errors[0]["spool_max_records"], 3);
    let ready = client
        .get(iris.url("/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(
        ready.status(),
        200,
        "PostgreSQL down is no reason to be unready"
    );
    let body = ready.text().await.expect("body");
    assert!(
        body.starts_with("ready; spend spool: 3 records waiting for PostgreSQL"),
        "{body}"
    );
}
