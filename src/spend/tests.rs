//! The spend log's writer (batching, overflow, retries, retention, shutdown)
//! over a sink the tests control, with tokio's clock paused; and both real
//! sinks (SQLite in a temporary directory, PostgreSQL in a schema of the
//! test's own) through one suite of aggregation checks.

use std::sync::atomic::{AtomicU32, AtomicUsize};
use std::time::Duration;

use tokio::sync::Semaphore;

use super::report::{Counts, Dimension, Query, Totals, UsageReport, format_time};
use super::*;
use crate::budget::money::Money;

use crate::budget::store::redis_tests::skip;
#[path = "../../tests/it/support/postgres.rs"]
mod shared_postgres;

/// A sink whose writes can be held (a stalled database) or failed.
struct TestSink {
    batches: Mutex<Vec<Vec<Record>>>,
    deletes: Mutex<Vec<i64>>,
    /// Writes attempted, failed ones included.
    attempts: AtomicUsize,
    /// Writes still to fail.
    failures: AtomicU32,
    /// A write waits for a permit: none, and the sink is stalled.
    gate: Semaphore,
}

impl TestSink {
    fn new(permits: usize) -> Arc<Self> {
        Arc::new(Self {
            batches: Mutex::default(),
            deletes: Mutex::default(),
            attempts: AtomicUsize::new(0),
            failures: AtomicU32::new(0),
            gate: Semaphore::new(permits),
        })
    }

    fn open() -> Arc<Self> {
        Self::new(1 << 20)
    }

    fn stalled() -> Arc<Self> {
        Self::new(0)
    }

    fn sizes(&self) -> Vec<usize> {
        self.batches.lock().unwrap().iter().map(Vec::len).collect()
    }

    /// The request ids of every record written, in the order written.
    fn request_ids(&self) -> Vec<String> {
        self.batches
            .lock()
            .unwrap()
            .iter()
            .flatten()
            .map(|r| r.facts.request_id.clone())
            .collect()
    }
}

impl Sink for TestSink {
    fn write(&self, batch: Arc<[Record]>) -> SinkFuture<'_, ()> {
        Box::pin(async move {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            let _permit = self.gate.acquire().await.unwrap();
            if self
                .failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(SinkError("refused".into()));
            }
            self.batches.lock().unwrap().push(batch.to_vec());
            Ok(())
        })
    }

    fn delete_before(&self, cutoff_ms: i64) -> SinkFuture<'_, u64> {
        self.deletes.lock().unwrap().push(cutoff_ms);
        Box::pin(async { Ok(0) })
    }

    fn totals<'a>(&'a self, _: &'a Query) -> SinkFuture<'a, Vec<Totals>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}

fn options(batch_size: usize, flush_ms: u64, queue_capacity: usize) -> WriterOptions {
    WriterOptions {
        queue_capacity,
        batch_size,
        flush: Duration::from_millis(flush_ms),
        ..WriterOptions::default()
    }
}

/// The request ids [`record`] gives records `numbers`.
fn request_ids(numbers: std::ops::Range<u64>) -> Vec<String> {
    numbers.map(|n| format!("req_{n}")).collect()
}

fn record(n: u64) -> Record {
    Record {
        record_id: format!("rec_{n}"),
        at_ms: 1_750_000_000_000,
        facts: Arc::new(RequestFacts {
            request_id: format!("req_{n}"),
            client: "a".into(),
            model: Some("m".into()),
            upstream: Some("up".into()),
            upstream_model: Some("up-m".into()),
            images: 0,
            image_bytes: 0,
            stream: false,
            attempts: 1,
            ..RequestFacts::default()
        }),
        status: 200,
        error_code: None,
        prompt_tokens: n,
        completion_tokens: 1,
        total_tokens: n + 1,
        cached_tokens: 0,
        reasoning_tokens: 0,
        cost: Money::ZERO,
        endpoint: Cow::Borrowed("chat"),
        ttfb_ms: Some(5),
        total_ms: 9,
    }
}

async fn pause(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

#[tokio::test(start_paused = true)]
async fn batches_fill_to_batch_size_or_wait_flush_ms() {
    let sink = TestSink::open();
    let log = SpendLog::start(sink.clone(), options(3, 100, 100), None);
    for n in 0..7 {
        log.record(record(n));
    }
    pause(50).await;
    assert_eq!(sink.sizes(), vec![3, 3], "full batches go at once");
    pause(60).await;
    assert_eq!(sink.sizes(), vec![3, 3, 1], "the rest after flush_ms");
    assert_eq!(log.counts(), (7, 0));
    assert_eq!(sink.request_ids(), request_ids(0..7));
}

/// A flush takes everything queued at once and writes it in batches of
/// `batch_size`, in order; the writer then batches on as before.
#[tokio::test(start_paused = true)]
async fn a_flush_writes_what_is_queued_in_batches_in_order() {
    let sink = TestSink::open();
    let log = SpendLog::start(sink.clone(), options(3, 100, 100), None);
    for n in 0..7 {
        log.record(record(n));
    }
    assert!(log.flush(Duration::from_secs(5)).await);
    assert_eq!(sink.sizes(), vec![3, 3, 1]);
    for n in 7..10 {
        log.record(record(n));
    }
    pause(1).await;
    assert_eq!(sink.sizes(), vec![3, 3, 1, 3]);
    assert_eq!(sink.request_ids(), request_ids(0..10));
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_drops_and_counts_without_waiting() {
    let sink = TestSink::stalled();
    let log = SpendLog::start(sink.clone(), options(1, 10, 4), None);
    log.record(record(0));
    pause(1).await; // the writer took it and is stuck in the sink
    assert_eq!(sink.attempts.load(Ordering::SeqCst), 1);
    for n in 1..=10 {
        log.record(record(n)); // returns at once, whatever the sink does
    }
    assert_eq!(log.counts(), (0, 6), "4 queued, 6 dropped");
    sink.gate.add_permits(100);
    assert!(log.flush(Duration::from_secs(5)).await);
    assert_eq!(log.counts(), (5, 6));
    assert_eq!(sink.sizes(), vec![1; 5]);
}

#[tokio::test(start_paused = true)]
async fn a_failing_sink_is_retried_then_its_batch_dropped() {
    let sink = TestSink::open();
    sink.failures.store(u32::MAX, Ordering::SeqCst);
    let log = SpendLog::start(sink.clone(), options(10, 10, 100), None);
    log.record(record(1));
    log.record(record(2));
    assert!(log.flush(Duration::from_secs(60)).await);
    assert_eq!(sink.attempts.load(Ordering::SeqCst), 3);
    assert_eq!(log.counts(), (0, 2));

    // A sink that comes back after two failures loses nothing.
    sink.failures.store(2, Ordering::SeqCst);
    log.record(record(3));
    assert!(log.flush(Duration::from_secs(60)).await);
    assert_eq!(log.counts(), (1, 2));
    assert_eq!(sink.sizes(), vec![1]);
}

/// What the spend log's writer logs, as text lines, for as long as the
/// guard of [`Logs::capture`] lives (on this thread: a paused-clock test's
/// runtime runs the writer here too).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn capture(&self) -> tracing::subscriber::DefaultGuard {
        let logs = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || logs.clone())
            .with_ansi(false)
            .without_time()
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn lines_with(&self, text: &str) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter(|line| line.contains(text))
            .map(str::to_owned)
            .collect()
    }
}

/// A sink that is down fails every batch, every attempt: one log line a
/// minute says so (docs/spend-log.md), each counting the failures it
/// stands for, not one line per failure.
#[tokio::test(start_paused = true)]
async fn a_sink_that_is_down_is_logged_once_a_minute() {
    let logs = Logs::default();
    let _capture = logs.capture();
    let sink = TestSink::open();
    sink.failures.store(u32::MAX, Ordering::SeqCst);
    let log = SpendLog::start(sink.clone(), options(1, 10, 1000), None);
    // A record a second for two and a half minutes: 150 batches, each
    // tried 3 times.
    for n in 0..150 {
        log.record(record(n));
        pause(1000).await;
    }
    assert!(log.flush(Duration::from_secs(60)).await);
    assert_eq!(sink.attempts.load(Ordering::SeqCst), 450);
    assert_eq!(log.counts(), (0, 150));
    let lines = logs.lines_with("spend log:");
    assert_eq!(lines.len(), 3, "at 0, 1 and 2 minutes: {lines:#?}");
    assert!(lines[0].contains("suppressed=0"), "{}", lines[0]);
    for line in &lines[1..] {
        let suppressed: u64 = line
            .split("suppressed=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no count in {line}"));
        assert!(suppressed > 100, "{line}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_write_that_never_answers_times_out_and_counts_as_failed() {
    let sink = TestSink::stalled();
    let options = WriterOptions {
        timeout: Duration::from_secs(1),
        attempts: 2,
        ..options(10, 10, 100)
    };
    let log = SpendLog::start(sink.clone(), options, None);
    log.record(record(1));
    assert!(log.flush(Duration::from_secs(60)).await);
    assert_eq!(sink.attempts.load(Ordering::SeqCst), 2);
    assert_eq!(log.counts(), (0, 1));
}

#[tokio::test(start_paused = true)]
async fn retention_runs_at_start_and_every_hour() {
    let sink = TestSink::open();
    let day = Duration::from_secs(86_400);
    let _log = SpendLog::start(sink.clone(), options(10, 10, 100), Some(day));
    pause(1).await;
    let now = unix_ms(SystemTime::now());
    let first = sink.deletes.lock().unwrap()[0];
    assert!((now - 86_400_000 - first).abs() < 5_000, "{first} vs {now}");
    tokio::time::sleep(RETENTION_EVERY).await;
    assert_eq!(sink.deletes.lock().unwrap().len(), 2);

    let kept = TestSink::open();
    let _forever = SpendLog::start(kept.clone(), options(10, 10, 100), None);
    tokio::time::sleep(RETENTION_EVERY * 2).await;
    assert!(kept.deletes.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn shutdown_writes_what_is_queued_then_drops_what_comes_later() {
    let sink = TestSink::open();
    let log = SpendLog::start(sink.clone(), options(100, 60_000, 100), None);
    for n in 0..5 {
        log.record(record(n));
    }
    assert!(log.shutdown(Duration::from_secs(1)).await);
    assert_eq!(sink.sizes(), vec![5]);
    log.record(record(5));
    assert_eq!(log.counts(), (5, 1));
}

#[tokio::test(start_paused = true)]
async fn shutdown_gives_up_on_a_stalled_sink_within_its_wait() {
    let sink = TestSink::stalled();
    let log = SpendLog::start(sink.clone(), options(1, 10, 100), None);
    log.record(record(0));
    let started = Instant::now();
    assert!(!log.shutdown(Duration::from_secs(2)).await);
    assert!(started.elapsed() <= Duration::from_secs(3));
}

#[test]
fn an_off_log_takes_records_and_answers_nothing() {
    let log = SpendLog::off();
    log.record(record(1));
    assert!(!log.is_on());
    assert_eq!(log.counts(), (0, 0));
}

// ---------------------------------------------------------------------------
// The real sinks, one suite

/// 2025-06-01T00:00:00Z in Unix ms.
const JUNE_1: i64 = 1_748_736_000_000;
const DAY: i64 = 86_400_000;

#[expect(clippy::too_many_arguments, reason = "a table of test records")]
fn row(
    at_ms: i64,
    client: &str,
    model: Option<&str>,
    upstream: Option<&str>,
    status: u16,
    code: Option<&str>,
    prompt: u64,
    completion: u64,
) -> Record {
    let base = record(0);
    Record {
        record_id: new_record_id(),
        at_ms,
        facts: Arc::new(RequestFacts {
            client: client.into(),
            // Client a is in a team; b is not.
            team: (client == "a").then(|| "research".into()),
            model: model.map(Into::into),
            upstream: upstream.map(Into::into),
            upstream_model: upstream.map(|u| format!("{u}-model")),
            ..(*base.facts).clone()
        }),
        status,
        error_code: code.map(Into::into),
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
        cached_tokens: prompt / 2,
        reasoning_tokens: completion / 2,
        cost: cost(prompt, completion),
        ttfb_ms: None,
        ..base
    }
}

/// A record's cost: an amount with micro-units in it, so that a sum that
/// went through floats would show.
fn cost(prompt: u64, completion: u64) -> Money {
    Money::from_micros(prompt * 1_234_567 + completion * 3)
}

fn fixture() -> Vec<Record> {
    vec![
        row(
            JUNE_1 - 1,
            "a",
            Some("m1"),
            Some("up1"),
            200,
            None,
            1000,
            1000,
        ), // before since
        row(JUNE_1, "a", Some("m1"), Some("up1"), 200, None, 10, 5),
        row(
            JUNE_1 + 3_600_000,
            "a",
            Some("m1"),
            Some("up1"),
            200,
            None,
            20,
            5,
        ),
        row(
            JUNE_1 + 7_200_000,
            "b",
            Some("m2"),
            Some("up2"),
            502,
            Some("upstream_unavailable"),
            0,
            0,
        ),
        row(
            JUNE_1 + 2 * DAY - 1,
            "a",
            Some("m2"),
            Some("up1"),
            200,
            Some("upstream_stream_interrupted"),
            7,
            3,
        ),
        row(
            JUNE_1 + DAY,
            "b",
            None,
            None,
            400,
            Some("invalid_request"),
            0,
            0,
        ),
        row(
            JUNE_1 + 2 * DAY,
            "a",
            Some("m1"),
            Some("up2"),
            200,
            None,
            1,
            1,
        ), // at until: out
    ]
}

fn counts(requests: u64, errors: u64, prompt: u64, completion: u64) -> Counts {
    Counts {
        requests,
        errors,
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
        cost: cost(prompt, completion),
    }
}

fn keys(totals: &[Totals]) -> Vec<Vec<Option<&str>>> {
    totals
        .iter()
        .map(|t| t.keys.iter().map(Option::as_deref).collect())
        .collect()
}

/// Writes the fixture through `sink` and checks every grouping, the
/// bounds (since inclusive, until exclusive), the client filter, the error
/// count, records without a model, and retention.
async fn aggregation_suite(sink: &dyn Sink) {
    sink.write(fixture().into()).await.expect("write");
    let query = |by: Vec<Dimension>| Query {
        since_ms: JUNE_1,
        until_ms: Some(JUNE_1 + 2 * DAY),
        client: None,
        by,
    };
    let all = sink.totals(&query(vec![])).await.expect("totals");
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].counts, counts(5, 3, 37, 13));

    let by_client = sink.totals(&query(vec![Dimension::Client])).await.unwrap();
    assert_eq!(keys(&by_client), vec![vec![Some("a")], vec![Some("b")]]);
    assert_eq!(by_client[0].counts, counts(3, 1, 37, 13));
    assert_eq!(by_client[1].counts, counts(2, 2, 0, 0));

    let by_day = sink.totals(&query(vec![Dimension::Day])).await.unwrap();
    assert_eq!(
        keys(&by_day),
        vec![vec![Some("2025-06-01")], vec![Some("2025-06-02")]]
    );
    assert_eq!(by_day[0].counts, counts(3, 1, 30, 10));
    assert_eq!(by_day[1].counts, counts(2, 2, 7, 3));

    let by_team = sink.totals(&query(vec![Dimension::Team])).await.unwrap();
    assert_eq!(keys(&by_team), vec![vec![None], vec![Some("research")]]);
    assert_eq!(by_team[1].counts, counts(3, 1, 37, 13));
    assert_eq!(
        by_team[1].counts.cost,
        Money::from_micros(37 * 1_234_567 + 13 * 3),
        "summed exactly, in micro-units"
    );
    let by_endpoint = sink
        .totals(&query(vec![Dimension::Endpoint]))
        .await
        .unwrap();
    assert_eq!(keys(&by_endpoint), vec![vec![Some("chat")]]);

    let by_model = sink.totals(&query(vec![Dimension::Model])).await.unwrap();
    assert_eq!(
        keys(&by_model),
        vec![vec![None], vec![Some("m1")], vec![Some("m2")]],
        "a record without a model is its own group, first"
    );

    let mut filtered = query(vec![Dimension::Upstream, Dimension::Model]);
    filtered.client = Some("a".into());
    let by_two = sink.totals(&filtered).await.unwrap();
    assert_eq!(
        keys(&by_two),
        vec![vec![Some("up1"), Some("m1")], vec![Some("up1"), Some("m2")]]
    );
    assert_eq!(by_two[0].counts, counts(2, 0, 30, 10));

    let open_ended = Query {
        until_ms: None,
        ..query(vec![])
    };
    assert_eq!(
        sink.totals(&open_ended).await.unwrap()[0].counts.requests,
        6
    );

    // The report over it: rows and their total agree.
    let report = UsageReport::new(&query(vec![Dimension::Client]), by_client, "EUR");
    assert_eq!(report.total, counts(5, 3, 37, 13));
    assert_eq!(report.currency, "EUR");
    assert_eq!(report.since, format_time(JUNE_1));

    assert_eq!(sink.delete_before(JUNE_1 + DAY).await.unwrap(), 4);
    let left = Query {
        since_ms: 0,
        ..open_ended
    };
    assert_eq!(sink.totals(&left).await.unwrap()[0].counts.requests, 3);
}

/// Records a millisecond either side of midnight at a year's end and
/// around a leap day (Unix times from GNU `date -u -d DATE +%s`): the days
/// that `since`/`until` name (the report's calendar) and the sink's `by=day`
/// keys (its SQL's) agree on every one.
async fn calendar_edges_suite(sink: &dyn Sink) {
    const JAN_1_2028: i64 = 1_830_297_600_000;
    const FEB_29_2028: i64 = 1_835_395_200_000;
    const MAR_1_2028: i64 = 1_835_481_600_000;
    let at = |ms| row(ms, "edge", Some("m1"), Some("up1"), 200, None, 1, 0);
    let records = [
        JAN_1_2028 - 1,
        JAN_1_2028,
        FEB_29_2028 - 1,
        FEB_29_2028,
        MAR_1_2028 - 1,
        MAR_1_2028,
    ];
    sink.write(records.map(at).to_vec().into())
        .await
        .expect("write");
    let by_day = |since: &'static str, until: &'static str| async move {
        let query = Query::parse(since, Some(until), Some("day"), MAR_1_2028).expect("query");
        let totals = sink.totals(&query).await.expect("totals");
        totals
            .into_iter()
            .map(|t| (t.keys[0].clone().unwrap_or_default(), t.counts.requests))
            .collect::<Vec<_>>()
    };
    let day = |key: &str, n| (key.to_owned(), n);
    assert_eq!(
        by_day("2027-12-31", "2028-03-02").await,
        vec![
            day("2027-12-31", 1),
            day("2028-01-01", 1),
            day("2028-02-28", 1),
            day("2028-02-29", 2),
            day("2028-03-01", 1),
        ]
    );
    assert_eq!(
        by_day("2028-02-29", "2028-03-01").await,
        vec![day("2028-02-29", 2)]
    );
    assert_eq!(
        by_day("2027-12-31T23:59:59Z", "2028-01-01T00:00:01Z").await,
        vec![day("2027-12-31", 1), day("2028-01-01", 1)]
    );
    assert_eq!(
        by_day("1d", "2028-03-01T00:00:00Z").await,
        vec![day("2028-02-29", 2)],
        "a day ago from March 1st is the leap day"
    );
}

#[tokio::test]
async fn sqlite_sink_keys_days_as_the_report_dates_them() {
    let memory = sqlite::SqliteSink::open(None).unwrap();
    calendar_edges_suite(&memory).await;
}

#[tokio::test]
async fn postgres_sink_keys_days_as_the_report_dates_them() {
    let Some(pg) = shared_postgres::SharedPostgres::get().await else {
        return;
    };
    let sink = postgres::PostgresSink::new(&Secret::new(pg.url()), None).unwrap();
    calendar_edges_suite(&sink).await;
}

/// A batch the writer sends again (its first attempt timed out behind a
/// long query, yet ran) is not counted twice, in memory as in a file: the
/// log's unique `record_id` keeps one copy of each record. The second
/// write succeeds (the writer would otherwise count a batch it wrote as
/// failed, and then as dropped), and adds the records it did not have.
#[tokio::test]
async fn a_batch_written_twice_is_counted_once_in_memory_and_in_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = sqlite::SqliteSink::open(Some(&dir.path().join("spend.db"))).unwrap();
    let memory = sqlite::SqliteSink::open(None).unwrap();
    for sink in [&file, &memory] {
        let batch: Arc<[Record]> = vec![record(1), record(2)].into();
        sink.write(Arc::clone(&batch)).await.unwrap();
        sink.write(batch)
            .await
            .expect("the copy is written: nothing new");
        sink.write(vec![record(2), record(3)].into())
            .await
            .expect("one record new, one known");
        let totals = sink.totals(&every_record()).await.unwrap();
        assert_eq!(totals[0].counts.requests, 3, "{totals:?}");
    }
}

/// A query for every record, as one total.
fn every_record() -> Query {
    Query {
        since_ms: 0,
        until_ms: None,
        client: None,
        by: vec![],
    }
}

/// The in-memory log's sink, whose first write lands and then never
/// answers: a write the writer gave up on (timed out) that ran anyway.
struct LandsThenHangs {
    inner: sqlite::SqliteSink,
    hung: AtomicU32,
}

impl Sink for LandsThenHangs {
    fn write(&self, batch: Arc<[Record]>) -> SinkFuture<'_, ()> {
        Box::pin(async move {
            self.inner.write(batch).await?;
            if self.hung.fetch_add(1, Ordering::SeqCst) == 0 {
                std::future::pending::<()>().await;
            }
            Ok(())
        })
    }

    fn delete_before(&self, cutoff_ms: i64) -> SinkFuture<'_, u64> {
        self.inner.delete_before(cutoff_ms)
    }

    fn totals<'a>(&'a self, query: &'a Query) -> SinkFuture<'a, Vec<Totals>> {
        self.inner.totals(query)
    }
}

/// The writer's side of the above: a batch whose first write timed out
/// yet landed is sent again, and the copy succeeds, so the batch counts
/// as written, not as dropped (`iris_spend_log_dropped_total`), and its
/// records are in the log once.
#[tokio::test]
async fn a_batch_whose_write_timed_out_yet_landed_counts_as_written_once() {
    let sink = Arc::new(LandsThenHangs {
        inner: sqlite::SqliteSink::open(None).unwrap(),
        hung: AtomicU32::new(0),
    });
    let options = WriterOptions {
        timeout: Duration::from_millis(200),
        backoff: Duration::from_millis(10),
        attempts: 3,
        ..options(10, 10, 100)
    };
    let log = SpendLog::start(sink.clone(), options, None);
    log.record(record(1));
    log.record(record(2));
    assert!(log.flush(Duration::from_secs(30)).await);
    assert_eq!(log.counts(), (2, 0), "written, none dropped");
    let totals = sink.totals(&every_record()).await.unwrap();
    assert_eq!(totals[0].counts.requests, 2, "{totals:?}");
}

#[tokio::test]
async fn sqlite_sink_aggregates() {
    let dir = tempfile::tempdir().unwrap();
    let sink = sqlite::SqliteSink::open(Some(&dir.path().join("spend.db"))).unwrap();
    aggregation_suite(&sink).await;
    let memory = sqlite::SqliteSink::open(None).unwrap();
    aggregation_suite(&memory).await;
}

#[tokio::test]
async fn sqlite_sink_shares_the_budget_stores_file_and_reads_back_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("iris.db");
    let store = tokio::task::spawn_blocking({
        let path = path.clone();
        move || crate::budget::store::SqliteStore::open(&path)
    })
    .await
    .unwrap()
    .unwrap();
    let sink = sqlite::SqliteSink::open(Some(&path)).unwrap();
    sink.write(fixture().into()).await.unwrap();
    crate::budget::store::Store::flush(&*store).await.unwrap();
    drop(store);
    assert!(crate::budget::store::SqliteStore::read(&path).is_ok());

    let reader = sqlite::SqliteSink::open_read_only(&path)
        .unwrap()
        .expect("the table is there");
    let query = Query {
        since_ms: 0,
        until_ms: None,
        client: None,
        by: vec![],
    };
    assert_eq!(reader.totals_now(&query).unwrap()[0].counts.requests, 7);
    assert!(
        sqlite::SqliteSink::open_read_only(&dir.path().join("none.db"))
            .unwrap()
            .is_none(),
        "no file, no log (and no file made)"
    );
    assert!(!dir.path().join("none.db").exists());
}

#[test]
fn sqlite_migrations_are_idempotent_and_a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spend.db");
    drop(sqlite::SqliteSink::open(Some(&path)).unwrap());
    drop(sqlite::SqliteSink::open(Some(&path)).unwrap());
    let db = rusqlite::Connection::open(&path).unwrap();
    let version: i64 = db
        .query_row(
            "SELECT version FROM schema_version WHERE component = 'spend_log'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(version, migrations::latest(migrations::SQLITE));
    db.execute(
        "UPDATE schema_version SET version = 99 WHERE component = 'spend_log'",
        [],
    )
    .unwrap();
    drop(db);
    let refused = sqlite::SqliteSink::open(Some(&path)).err().unwrap();
    assert!(refused.0.contains("schema version 99"), "{refused}");
}

/// A database at schema version 2 (before money and teams) is migrated in
/// place: its old records read as no team, 0 cost, `chat`; new ones keep
/// every field.
#[tokio::test]
async fn sqlite_migration_3_keeps_older_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spend.db");
    {
        let db = rusqlite::Connection::open(&path).unwrap();
        db.execute_batch(migrations::SQLITE_VERSION_TABLE).unwrap();
        for migration in &migrations::SQLITE[..2] {
            db.execute_batch(migration.sql).unwrap();
        }
        db.execute_batch(
            "INSERT INTO schema_version VALUES ('spend_log', 2);
             INSERT INTO spend_log (at, request_id, client, status, prompt_tokens,
                completion_tokens, total_tokens, images, image_bytes, stream, attempts,
                total_ms) VALUES (1748736000000, 'old', 'a', 200, 10, 5, 15, 0, 0, 0, 1, 9);",
        )
        .unwrap();
    }
    // Read-only (`iris usage`) migrates nothing: it says what to do.
    let refused = sqlite::SqliteSink::open_read_only(&path).err().unwrap();
    assert!(refused.0.contains("schema version 2, older"), "{refused}");
    let sink = sqlite::SqliteSink::open(Some(&path)).unwrap();
    let mut new = row(JUNE_1, "a", Some("m1"), Some("up1"), 200, None, 10, 5);
    new.facts = Arc::new(RequestFacts {
        request_id: "new".into(),
        ..(*new.facts).clone()
    });
    sink.write(vec![new].into()).await.unwrap();
    let db = rusqlite::Connection::open(&path).unwrap();
    let read = |id: &str| {
        db.query_row(
            "SELECT team, cached_tokens, reasoning_tokens, cost_micros, endpoint
             FROM spend_log WHERE request_id = ?1",
            [id],
            |r| {
                Ok((
                    r.get::<_, Option<String>>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, String>(4)?,
                ))
            },
        )
        .unwrap()
    };
    assert_eq!(read("old"), (None, 0, 0, 0, "chat".into()));
    let cache_hit = |id: &str| {
        db.query_row(
            "SELECT cache_hit FROM spend_log WHERE request_id = ?1",
            [id],
            |r| r.get::<_, i64>(0),
        )
        .unwrap()
    };
    assert_eq!((cache_hit("old"), cache_hit("new")), (0, 0));
    assert_eq!(
        read("new"),
        (Some("research".into()), 5, 2, 12_345_685, "chat".into())
    );
}

#[tokio::test]
async fn postgres_sink_migrates_writes_and_aggregates() {
    let Some(pg) = shared_postgres::SharedPostgres::get().await else {
        return;
    };
    let url = Secret::new(pg.url());
    let sink = postgres::PostgresSink::new(&url, None).unwrap();
    aggregation_suite(&sink).await;

    // A second instance on the same database: nothing migrated twice.
    let again = postgres::PostgresSink::new(&url, None).unwrap();
    let everything = Query {
        since_ms: 0,
        until_ms: None,
        client: None,
        by: vec![],
    };
    assert_eq!(
        again.totals(&everything).await.unwrap()[0].counts.requests,
        3
    );
    let client = pg.client().await;
    let version: i64 = client
        .query_one(
            "SELECT version FROM schema_version WHERE component = 'spend_log'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, migrations::latest(migrations::POSTGRES));
    let at: SystemTime = client
        .query_one("SELECT max(at) FROM spend_log", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(unix_ms(at), JUNE_1 + 2 * DAY, "times are real timestamps");
    // A response-cache hit is marked; other records are not.
    let mut hit = record(7);
    hit.facts = Arc::new(RequestFacts {
        request_id: "hit".into(),
        cache: Some(crate::facts::CacheOutcome::Hit),
        ..(*hit.facts).clone()
    });
    sink.write(vec![hit, record(8)].into()).await.unwrap();
    let marked: Vec<(String, bool)> = client
        .query(
            "SELECT request_id, cache_hit FROM spend_log WHERE request_id IN ('hit', 'req_8') \
             ORDER BY request_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(marked, [("hit".into(), true), ("req_8".into(), false)]);

    client
        .execute(
            "UPDATE schema_version SET version = 99 WHERE component = 'spend_log'",
            &[],
        )
        .await
        .unwrap();
    let newer = postgres::PostgresSink::new(&url, None).unwrap();
    let refused = newer.totals(&everything).await.unwrap_err();
    assert!(refused.0.contains("schema version 99"), "{refused}");
}

#[tokio::test]
async fn a_postgres_that_is_down_fails_each_operation_promptly() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let sink = postgres::PostgresSink::new(
        &Secret::new(format!("postgres://iris@127.0.0.1:{port}/x")),
        None,
    )
    .unwrap();
    let started = std::time::Instant::now();
    let error = sink.write(vec![record(1)].into()).await.unwrap_err();
    assert!(error.0.starts_with("postgres: "), "{error}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn postgres_urls_are_checked_without_being_printed() {
    assert!(postgres::check_url("postgres://u:secret@db:5432/iris").is_ok());
    assert!(postgres::check_url("host=db user=iris dbname=iris").is_ok());
    let bad = postgres::check_url("postgres://u:secret@db:notaport/iris").unwrap_err();
    assert!(!bad.contains("secret"), "{bad}");
    for (url, mode) in [
        (
            "postgres://db/iris?sslmode=require",
            postgres::TlsMode::Require,
        ),
        (
            "postgres://db/iris?sslmode=verify-full",
            postgres::TlsMode::VerifyFull,
        ),
        ("postgres://db/iris", postgres::TlsMode::Prefer),
    ] {
        assert_eq!(postgres::check_url(url).unwrap().1, mode, "{url}");
    }
    let unknown = postgres::check_url("postgres://u:secret@db/iris?sslmode=bogus").unwrap_err();
    assert!(unknown.contains("sslmode=bogus"), "{unknown}");
    assert!(!unknown.contains("secret"), "{unknown}");
}

fn settings(backend: SpendBackend) -> SpendSettings {
    SpendSettings {
        backend,
        retention: None,
        writer: options(100, 50, 1000),
    }
}

/// The SQLite store at `path`, and the spend log in its file.
async fn sqlite_store_with_its_log(
    path: &std::path::Path,
) -> (Arc<crate::budget::store::SqliteStore>, SpendLog) {
    let store = crate::budget::store::SqliteStore::open(path).unwrap();
    let backend = StoreBackend::Sqlite {
        path: path.to_owned(),
    };
    let log = SpendLog::open(
        &settings(SpendBackend::Sqlite { path: None }),
        &backend,
        Some(&store),
    )
    .await
    .unwrap();
    (store, log)
}

/// With the SQLite store and the log in its file, a record is made durable
/// by the store's own write (the settlement's frame of its write-ahead
/// log) and committed to the table by the store's flush, with no write of
/// the log's own.
#[tokio::test]
async fn records_ride_in_the_sqlite_stores_transactions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("iris.db");
    let (store, log) = sqlite_store_with_its_log(&path).await;
    assert!(log.commits());
    let on_disk = || -> i64 {
        rusqlite::Connection::open(&path)
            .unwrap()
            .query_row("SELECT count(*) FROM spend_log", [], |row| row.get(0))
            .unwrap()
    };
    log.record(record(1));
    log.record(record(2));
    assert_eq!(on_disk(), 0, "waiting for the next commit");
    // Nothing to wait for beyond the store's own write...
    log.committed_with_settlement().await.unwrap();
    assert_eq!(on_disk(), 0);
    // ...which takes them into its write-ahead log...
    crate::budget::store::Store::persisted(&*store)
        .await
        .unwrap();
    assert_eq!(on_disk(), 0, "in the log's frame, not yet in the table");
    assert!(dir.path().join("iris.db.wal.1").exists());
    // ...and its flush into the table.
    // A reader of the file meanwhile (`iris usage --since`) sees them.
    let query = Query {
        since_ms: 0,
        until_ms: None,
        client: None,
        by: vec![],
    };
    let read = || {
        sqlite::SqliteSink::open_read_only(&path)
            .unwrap()
            .expect("the table is there")
            .totals_now(&query)
            .unwrap()[0]
            .counts
            .requests
    };
    assert_eq!(read(), 2, "through the log");
    crate::budget::store::Store::flush(&*store).await.unwrap();
    assert_eq!(on_disk(), 2, "both in the store's flush");
    assert_eq!(read(), 2, "once");
    assert_eq!(log.counts(), (2, 0));
}

/// A batch PostgreSQL took, whose acknowledgement a crash lost before the
/// spool let go of it, is sent again after the restart: it lands once.
#[tokio::test]
async fn a_batch_sent_again_after_a_crash_lands_once() {
    let Some(pg) = shared_postgres::SharedPostgres::get().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool.db");
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        format!("postgres://iris@127.0.0.1:{port}/x")
    };
    let postgres = |url: String| {
        settings(SpendBackend::Postgres {
            url: Secret::new(url),
            ca_file: None,
            spool: Some(spool.clone()),
        })
    };
    // PostgreSQL down: five records committed to the spool.
    let down = SpendLog::open(&postgres(closed), &StoreBackend::Memory, None)
        .await
        .unwrap();
    for n in 0..5 {
        down.record(record(n));
    }
    down.committed().await.unwrap();
    assert_eq!(down.backlog(), Some((5, false)));
    down.shutdown(Duration::from_millis(200)).await;
    drop(down);

    // The shipper sent them, and crashed before deleting them: PostgreSQL
    // has them (a batch sent twice there is kept once, too).
    let (spooled, waiting) = spool::Spool::open(&spool).unwrap();
    assert_eq!(waiting, 5);
    let batch: Arc<[Record]> = spooled
        .oldest(100)
        .unwrap()
        .into_iter()
        .map(|(_, record)| record)
        .collect();
    assert_eq!(batch.len(), 5);
    let sink = postgres::PostgresSink::new(&Secret::new(pg.url()), None).unwrap();
    sink.write(Arc::clone(&batch)).await.unwrap();
    sink.write(batch).await.unwrap();

    // The restart sends the spool first: nothing twice.
    let up = SpendLog::open(&postgres(pg.url()), &StoreBackend::Memory, None)
        .await
        .unwrap();
    assert!(up.flush(Duration::from_secs(10)).await);
    assert_eq!(up.backlog(), Some((0, false)));
    let (records, ids): (i64, i64) = {
        let row = pg
            .client()
            .await
            .query_one(
                "SELECT count(*), count(DISTINCT request_id) FROM spend_log",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!((records, ids), (5, 5));
    assert_eq!(waiting_in(&spool), 0, "out of the spool once acknowledged");
}

fn waiting_in(spool: &std::path::Path) -> u64 {
    spool::Spool::open(spool).unwrap().1
}

/// Each record's columns are its own, though a column that has the
/// previous record's value is not bound again: values that change, stay,
/// become null and come back read back as they were written.
#[test]
fn records_in_one_batch_read_back_column_for_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.db");
    let (spooled, _) = spool::Spool::open(&path).unwrap();
    let with = |n: u64, facts: RequestFacts, change: fn(&mut Record)| {
        let mut record = record(n);
        record.facts = Arc::new(facts);
        change(&mut record);
        record
    };
    let base = (*record(0).facts).clone();
    let other = RequestFacts {
        client: "b".into(),
        model: None,
        team: Some("t".into()),
        client_addr: Some("203.0.113.9".parse().unwrap()),
        images: 2,
        stream: true,
        ..base.clone()
    };
    let batch = [
        with(1, base.clone(), |_| {}),
        with(2, base.clone(), |_| {}),
        with(3, other.clone(), |r| {
            r.status = 429;
            r.error_code = Some("rate_limit_exceeded".into());
            r.ttfb_ms = None;
        }),
        with(4, other, |r| r.ttfb_ms = None),
        with(5, base, |r| r.endpoint = Cow::Borrowed("embeddings")),
    ];
    let batch: Vec<Record> = batch
        .into_iter()
        .map(|mut r| {
            let request_id = format!("req_{}", r.prompt_tokens);
            r.facts = Arc::new(RequestFacts {
                request_id,
                api: if r.endpoint == "embeddings" {
                    crate::openai::Api::Embeddings
                } else {
                    crate::openai::Api::Chat
                },
                ..(*r.facts).clone()
            });
            r
        })
        .collect();
    let db = rusqlite::Connection::open(&path).unwrap();
    sqlite::insert_into(&db, sqlite::Table::Spool, &batch).unwrap();
    let read: Vec<Record> = spooled
        .oldest(10)
        .unwrap()
        .into_iter()
        .map(|(_, record)| record)
        .collect();
    assert_eq!(read, batch);
}

#[test]
fn a_cache_hit_is_still_one_when_read_back_from_the_spool() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.db");
    let (spooled, _) = spool::Spool::open(&path).unwrap();
    let mut hit = record(1);
    hit.facts = Arc::new(RequestFacts {
        cache: Some(crate::facts::CacheOutcome::Hit),
        ..(*hit.facts).clone()
    });
    let db = rusqlite::Connection::open(&path).unwrap();
    sqlite::insert_into(&db, sqlite::Table::Spool, &[hit, record(2)]).unwrap();
    let read: Vec<bool> = spooled
        .oldest(10)
        .unwrap()
        .iter()
        .map(|(_, record)| record.cache_hit())
        .collect();
    assert_eq!(read, [true, false]);
}

/// A reader of the file (`iris usage --since`) while the server records,
/// logs and folds: every read sees every record made durable before it
/// began, and none twice, however the flushes fall between its reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_racing_the_folds_sees_each_durable_record_once() {
    use std::sync::atomic::AtomicU64;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("iris.db");
    let (store, log) = sqlite_store_with_its_log(&path).await;
    const RECORDS: u64 = 400;
    let durable = Arc::new(AtomicU64::new(0));
    let recorded = Arc::new(AtomicU64::new(0));
    let reader = std::thread::spawn({
        let (path, durable, recorded) = (path.clone(), durable.clone(), recorded.clone());
        move || {
            let query = Query {
                since_ms: 0,
                until_ms: None,
                client: None,
                by: vec![],
            };
            let mut reads = 0;
            loop {
                let before = durable.load(Ordering::SeqCst);
                let seen = sqlite::SqliteSink::open_read_only(&path)
                    .unwrap()
                    .map_or(0, |reader| {
                        reader
                            .totals_now(&query)
                            .unwrap()
                            .first()
                            .map_or(0, |t| t.counts.requests)
                    });
                let after = recorded.load(Ordering::SeqCst);
                assert!(
                    before <= seen && seen <= after,
                    "{before} <= {seen} <= {after}"
                );
                reads += 1;
                if before == RECORDS {
                    return reads;
                }
            }
        }
    });
    for n in 0..RECORDS {
        recorded.fetch_add(1, Ordering::SeqCst);
        log.record(record(n));
        crate::budget::store::Store::persisted(&*store)
            .await
            .unwrap();
        durable.fetch_add(1, Ordering::SeqCst);
        if n % 9 == 0 {
            crate::budget::store::Store::flush(&*store).await.unwrap();
        }
        if n % 4 == 0 {
            tokio::task::yield_now().await;
        }
    }
    let reads = tokio::task::spawn_blocking(move || reader.join().unwrap())
        .await
        .unwrap();
    assert!(reads > 1, "the reader raced the writer");
}

#[test]
fn addresses_are_written_as_display_writes_them() {
    for text in [
        "0.0.0.0",
        "127.0.0.1",
        "10.20.100.255",
        "9.99.199.200",
        "::1",
        "2001:db8::8",
        "::ffff:192.0.2.1",
        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    ] {
        let addr: std::net::IpAddr = text.parse().expect("address");
        assert_eq!(super::address_text(addr).as_str(), addr.to_string());
        assert_eq!(super::address_text(addr).as_str(), text);
    }
}
