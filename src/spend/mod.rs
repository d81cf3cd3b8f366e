//! The spend log: one [`Record`] per finished request (chat completions
//! and embeddings, errors included), for "who used what, on which model, this month".
//!
//! The request path only ever calls [`SpendLog::record`], which puts the
//! record in a bounded queue without waiting: when the queue is full the
//! record is dropped and counted (`iris_spend_log_dropped_total`), so a slow
//! or dead sink never slows or fails a request. A background writer takes
//! records off the queue in batches (`batch_size` records, or whatever came
//! within `flush_ms`) and writes each batch through a [`Sink`]: SQLite
//! ([`sqlite`], the default, in the budget store's file) or PostgreSQL
//! ([`postgres`], for many instances). A batch the sink refuses is retried a
//! few times, then dropped and counted. The same writer deletes records
//! older than `retention_days` every hour.
//!
//! Each sink creates and migrates its own tables ([`migrations`]), and
//! answers the aggregation behind `iris usage --since` and
//! `GET /admin/usage` ([`report`]).

pub mod migrations;
pub mod postgres;
pub mod report;
pub mod sqlite;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::budget::money::Money;
use crate::budget::{Charged, StoreBackend};
use crate::facts::RequestFacts;
use crate::secret::Secret;
use crate::tls::PrivateCa;
pub use report::{Dimension, Query, QueryError, UsageReport};

/// One finished chat completion, as the contract lists its fields: the
/// request's facts (its id, client and team, model, upstream and the
/// upstream's name for the model, images and their bytes, stream,
/// attempts) and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// When the request ended (its response body finished), Unix milliseconds.
    pub at_ms: i64,
    /// What the request learned on its way, shared with its log line.
    pub facts: Arc<RequestFacts>,
    /// The HTTP status the client got.
    pub status: u16,
    /// Iris's error code, the upstream's for an error passed through,
    /// `upstream_stream_interrupted` / `server_shutting_down` for an answer
    /// cut short, or `client_disconnected`.
    pub error_code: Option<String>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// What the budget was charged: the upstream's `total_tokens`, or the
    /// sum where it reported none.
    pub total_tokens: u64,
    /// Of `prompt_tokens`, served from the provider's cache.
    pub cached_tokens: u64,
    /// Of `completion_tokens`, reasoning.
    pub reasoning_tokens: u64,
    /// The tokens at the answering deployment's prices (what the budget's
    /// cost windows were charged).
    pub cost: Money,
    /// Which endpoint the request came in on: `chat` or `embeddings`
    /// ([`crate::openai::Api::as_str`]).
    pub endpoint: &'static str,
    /// From the request's arrival to the first byte of the upstream's
    /// answer going to the client; none when Iris answered itself.
    pub ttfb_ms: Option<u64>,
    /// From the request's arrival to the end of its response body.
    pub total_ms: u64,
}

impl Record {
    /// Whether the record counts as an error in the totals: an error
    /// status, or an answer that did not end well.
    pub fn is_error(&self) -> bool {
        self.status >= 400 || self.error_code.is_some()
    }

    /// The record of a request Iris answered with an error itself, now
    /// (nothing charged: its reservation, if any, was given back).
    pub fn refused(
        facts: Arc<RequestFacts>,
        status: u16,
        error_code: &str,
        started: Instant,
    ) -> Self {
        Self {
            at_ms: unix_ms(SystemTime::now()),
            endpoint: facts.api.as_str(),
            facts,
            status,
            error_code: Some(error_code.to_owned()),
            prompt_tokens: 0,
            completion_tokens: 0,
            total_tokens: 0,
            cached_tokens: 0,
            reasoning_tokens: 0,
            cost: Money::ZERO,
            ttfb_ms: None,
            total_ms: millis(started.elapsed()),
        }
    }
}

/// Unix milliseconds of `time`.
pub fn unix_ms(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A relayed answer's record but for how it ends, kept by its body until
/// then: the record is finished with how it ended and what the budget was
/// charged.
pub struct Draft {
    pub log: SpendLog,
    pub facts: Arc<RequestFacts>,
    /// The HTTP status the client got.
    pub status: u16,
    /// When the request arrived.
    pub started: Instant,
}

/// How a relayed answer ended, for its record.
#[derive(Debug, Clone, Default)]
pub struct Ending {
    /// `None`: it ended well (or as the upstream's error it relays).
    pub error_code: Option<String>,
    /// When its first byte went to the client, if one did.
    pub first_byte: Option<Instant>,
}

impl Draft {
    /// The record of a request that ended now, and the hook that sends it
    /// once the budget is settled (its token counts are the settlement's).
    pub fn finish(self, ending: Ending) -> impl FnOnce(Charged) + Send + 'static {
        let total_ms = millis(self.started.elapsed());
        let ttfb_ms = ending
            .first_byte
            .map(|at| millis(at.saturating_duration_since(self.started)));
        let at_ms = unix_ms(SystemTime::now());
        move |charged: Charged| {
            let record = Record {
                at_ms,
                endpoint: self.facts.api.as_str(),
                facts: self.facts,
                status: self.status,
                error_code: ending.error_code,
                prompt_tokens: charged.prompt,
                completion_tokens: charged.completion,
                total_tokens: charged.total,
                cached_tokens: charged.cached,
                reasoning_tokens: charged.reasoning,
                cost: charged.cost,
                ttfb_ms,
                total_ms,
            };
            self.log.record(record);
        }
    }
}

// ---------------------------------------------------------------------------
// Settings

/// Where the spend log is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpendBackend {
    /// Not kept.
    Off,
    /// A SQLite database file; `None`: in memory (with `store.kind =
    /// "memory"`: nothing persisted, like the store).
    Sqlite { path: Option<PathBuf> },
    /// Shared by every instance; `ca_file`: a private CA for the
    /// database's certificate (`sslmode=verify-full`).
    Postgres {
        url: Secret,
        ca_file: Option<PrivateCa>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendSettings {
    pub backend: SpendBackend,
    /// Records older than this are deleted; `None` keeps them forever.
    pub retention: Option<Duration>,
    pub writer: WriterOptions,
}

/// How the background writer batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterOptions {
    /// Records waiting to be written; more are dropped (and counted).
    pub queue_capacity: usize,
    /// A batch is written once it has this many records...
    pub batch_size: usize,
    /// ...or this long after its first record arrived.
    pub flush: Duration,
    /// Attempts per batch before it is dropped.
    pub attempts: u32,
    /// The longest one sink operation may take before it counts as failed.
    pub timeout: Duration,
    /// Pause before the second attempt; doubled for each further one.
    pub backoff: Duration,
}

impl Default for WriterOptions {
    fn default() -> Self {
        Self {
            queue_capacity: 10_000,
            batch_size: 500,
            flush: Duration::from_secs(1),
            attempts: 3,
            timeout: Duration::from_secs(10),
            backoff: Duration::from_millis(250),
        }
    }
}

/// How often records past their retention are deleted.
pub const RETENTION_EVERY: Duration = Duration::from_secs(3600);

/// Failed writes are logged at most this often (each line says how many
/// were not logged since).
const ERROR_LOG_EVERY: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Sinks

/// The future every sink operation returns.
pub type SinkFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, SinkError>> + Send + 'a>>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SinkError(pub String);

/// Where records go, and where the totals come from.
pub trait Sink: Send + Sync + 'static {
    /// Writes `batch` whole, or nothing.
    fn write(&self, batch: Arc<[Record]>) -> SinkFuture<'_, ()>;
    /// Deletes the records from before `cutoff_ms`; returns how many.
    fn delete_before(&self, cutoff_ms: i64) -> SinkFuture<'_, u64>;
    /// The totals `query` asks for, one row per group, in key order.
    fn totals<'a>(&'a self, query: &'a Query) -> SinkFuture<'a, Vec<report::Totals>>;
}

/// Why the spend log cannot answer a question.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpendError {
    #[error("the spend log is off (spend_log.kind = \"off\")")]
    Off,
    #[error("spend log: {0}")]
    Sink(#[from] SinkError),
}

/// Opens the sink `settings` name, next to the budget `store`: SQLite goes
/// in the store's file when the store is SQLite, in memory when it is
/// memory, else in `spend_log.path`. `None` when the log is off.
pub async fn open_sink(
    settings: &SpendSettings,
    store: &StoreBackend,
) -> Result<Option<Arc<dyn Sink>>, String> {
    Ok(match &settings.backend {
        SpendBackend::Off => None,
        SpendBackend::Sqlite { path } => {
            let path = sqlite_path(path.as_ref(), store);
            let sink =
                tokio::task::spawn_blocking(move || sqlite::SqliteSink::open(path.as_deref()))
                    .await
                    .map_err(|e| format!("spend log: {e}"))?
                    .map_err(|e| format!("spend log: {e}"))?;
            Some(Arc::new(sink))
        }
        SpendBackend::Postgres { url, ca_file } => Some(Arc::new(
            postgres::PostgresSink::new(url, ca_file.as_ref())
                .map_err(|e| format!("spend log: {e}"))?,
        )),
    })
}

/// The SQLite file of the spend log: `spend_log.path` if set, else the
/// budget store's file, else (memory store) none: in memory.
pub fn sqlite_path(path: Option<&PathBuf>, store: &StoreBackend) -> Option<PathBuf> {
    match (path, store) {
        (Some(path), _) => Some(path.clone()),
        (None, StoreBackend::Sqlite { path }) => Some(path.clone()),
        (None, StoreBackend::Memory) => None,
        (None, StoreBackend::Redis { .. }) => Some(PathBuf::from(DEFAULT_FILE)),
    }
}

/// The spend log's own file when the budget store is not SQLite.
pub const DEFAULT_FILE: &str = "iris-spend.db";

// ---------------------------------------------------------------------------
// The handle and its writer

/// The spend log of one process: cheap to clone; every clone feeds the same
/// queue and writer.
#[derive(Clone, Default)]
pub struct SpendLog {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    records: mpsc::Sender<Record>,
    stats: Arc<Stats>,
    control: mpsc::UnboundedSender<Control>,
    sink: Arc<dyn Sink>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

enum Control {
    /// Write everything queued so far, then answer.
    Flush(oneshot::Sender<()>),
    /// Write everything queued, then stop.
    Shutdown(oneshot::Sender<()>),
}

impl SpendLog {
    /// A spend log that keeps nothing.
    pub fn off() -> Self {
        Self::default()
    }

    /// Opens the configured sink and starts its writer.
    pub async fn open(settings: &SpendSettings, store: &StoreBackend) -> Result<Self, String> {
        Ok(match open_sink(settings, store).await? {
            Some(sink) => Self::start(sink, settings.writer, settings.retention),
            None => Self::off(),
        })
    }

    /// Starts a writer for `sink` (tests bring their own sinks).
    pub fn start(sink: Arc<dyn Sink>, options: WriterOptions, retention: Option<Duration>) -> Self {
        let (records, queue) = mpsc::channel(options.queue_capacity.max(1));
        let (control, commands) = mpsc::unbounded_channel();
        let stats = Arc::new(Stats::default());
        let writer = Writer {
            sink: Arc::clone(&sink),
            stats: Arc::clone(&stats),
            options,
            retention,
            errors: ErrorLog::default(),
        };
        let task = tokio::spawn(writer.run(queue, commands));
        Self {
            inner: Some(Arc::new(Inner {
                records,
                stats,
                control,
                sink,
                writer: Mutex::new(Some(task)),
            })),
        }
    }

    pub fn is_on(&self) -> bool {
        self.inner.is_some()
    }

    /// Queues `record` for the writer, never waiting: a full queue drops it
    /// (counted in `iris_spend_log_dropped_total{reason="queue_full"}`).
    pub fn record(&self, record: Record) {
        let Some(inner) = &self.inner else { return };
        match inner.records.try_send(record) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => inner.stats.dropped("queue_full", 1),
            Err(mpsc::error::TrySendError::Closed(_)) => inner.stats.dropped("stopped", 1),
        }
    }

    /// Records written and dropped by this process so far.
    pub fn counts(&self) -> (u64, u64) {
        self.inner.as_ref().map_or((0, 0), |inner| {
            (
                inner.stats.written.load(Ordering::Relaxed),
                inner.stats.dropped.load(Ordering::Relaxed),
            )
        })
    }

    /// Waits (at most `wait`) until every record queued before the call is
    /// written or dropped. False if that did not happen in time.
    pub async fn flush(&self, wait: Duration) -> bool {
        self.command(Control::Flush, wait).await
    }

    /// At shutdown: writes what is queued (at most `wait`) and stops the
    /// writer; records that come later are dropped and counted.
    pub async fn shutdown(&self, wait: Duration) -> bool {
        let Some(inner) = &self.inner else {
            return true;
        };
        let done = self.command(Control::Shutdown, wait).await;
        let task = inner
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            if done {
                let _ = tokio::time::timeout(wait, task).await;
            } else {
                // The sink is stuck: what is still queued is lost.
                task.abort();
            }
        }
        done
    }

    async fn command(&self, make: fn(oneshot::Sender<()>) -> Control, wait: Duration) -> bool {
        let Some(inner) = &self.inner else {
            return true;
        };
        let (ack, done) = oneshot::channel();
        if inner.control.send(make(ack)).is_err() {
            return true; // the writer has stopped: nothing waits in its queue
        }
        matches!(tokio::time::timeout(wait, done).await, Ok(Ok(())))
    }

    /// The totals `query` asks for, from the sink (records still queued are
    /// not in them yet: at most `flush_ms` behind).
    pub async fn totals(&self, query: &Query) -> Result<Vec<report::Totals>, SpendError> {
        let inner = self.inner.as_ref().ok_or(SpendError::Off)?;
        Ok(inner.sink.totals(query).await?)
    }

    /// The sink itself, if the log is on.
    pub fn sink(&self) -> Option<&Arc<dyn Sink>> {
        self.inner.as_ref().map(|inner| &inner.sink)
    }
}

/// What the metrics count, also kept for [`SpendLog::counts`].
#[derive(Default)]
struct Stats {
    written: AtomicU64,
    dropped: AtomicU64,
}

impl Stats {
    fn dropped(&self, reason: &'static str, records: usize) {
        self.dropped.fetch_add(records as u64, Ordering::Relaxed);
        crate::metrics::SPEND_LOG_DROPPED
            .counter(&[("reason", reason)])
            .increment(records as u64);
    }

    fn written(&self, records: usize) {
        self.written.fetch_add(records as u64, Ordering::Relaxed);
        crate::metrics::SPEND_LOG_WRITTEN
            .counter(&[])
            .increment(records as u64);
    }
}

struct Writer {
    sink: Arc<dyn Sink>,
    stats: Arc<Stats>,
    options: WriterOptions,
    retention: Option<Duration>,
    errors: ErrorLog,
}

impl Writer {
    async fn run(
        mut self,
        mut queue: mpsc::Receiver<Record>,
        mut commands: mpsc::UnboundedReceiver<Control>,
    ) {
        let batch_size = self.options.batch_size.max(1);
        let mut batch: Vec<Record> = Vec::with_capacity(batch_size);
        // When the batch being collected must be written at the latest.
        let mut due: Option<Instant> = None;
        let mut retention = tokio::time::interval(RETENTION_EVERY);
        retention.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = due.unwrap_or_else(|| Instant::now() + RETENTION_EVERY);
            tokio::select! {
                biased;
                command = commands.recv() => match command {
                    Some(Control::Flush(ack)) => {
                        drain(&mut queue, &mut batch, usize::MAX);
                        self.write_all(&mut batch, batch_size).await;
                        due = None;
                        let _ = ack.send(());
                    }
                    Some(Control::Shutdown(ack)) => {
                        queue.close();
                        drain(&mut queue, &mut batch, usize::MAX);
                        self.write_all(&mut batch, batch_size).await;
                        let _ = ack.send(());
                        return;
                    }
                    // Every handle is gone: write what is left and stop.
                    None => {
                        queue.close();
                        drain(&mut queue, &mut batch, usize::MAX);
                        self.write_all(&mut batch, batch_size).await;
                        return;
                    }
                },
                record = queue.recv() => {
                    let Some(record) = record else {
                        self.write_all(&mut batch, batch_size).await;
                        return;
                    };
                    batch.push(record);
                    drain(&mut queue, &mut batch, batch_size);
                    if batch.len() >= batch_size {
                        self.write_all(&mut batch, batch_size).await;
                        due = None;
                    } else if due.is_none() {
                        due = Some(Instant::now() + self.options.flush);
                    }
                }
                () = tokio::time::sleep_until(deadline), if due.is_some() => {
                    self.write_all(&mut batch, batch_size).await;
                    due = None;
                }
                _ = retention.tick() => self.expire().await,
            }
        }
    }

    /// Writes `batch` in chunks of at most `size`, emptying it.
    async fn write_all(&mut self, batch: &mut Vec<Record>, size: usize) {
        while !batch.is_empty() {
            let rest = batch.split_off(batch.len().min(size));
            let chunk: Arc<[Record]> = std::mem::replace(batch, rest).into();
            self.write(chunk).await;
        }
    }

    /// One batch, retried with backoff; dropped (and counted) when every
    /// attempt failed.
    async fn write(&mut self, batch: Arc<[Record]>) {
        let mut pause = self.options.backoff;
        for attempt in 1..=self.options.attempts.max(1) {
            let result = match tokio::time::timeout(
                self.options.timeout,
                self.sink.write(Arc::clone(&batch)),
            )
            .await
            {
                Ok(result) => result,
                Err(_) => Err(SinkError(format!(
                    "no answer within {} ms",
                    self.options.timeout.as_millis()
                ))),
            };
            match result {
                Ok(()) => {
                    self.stats.written(batch.len());
                    return;
                }
                Err(e) => {
                    crate::metrics::SPEND_LOG_WRITE_FAILURES
                        .counter(&[])
                        .increment(1);
                    let last = attempt >= self.options.attempts.max(1);
                    self.errors.error(&e, batch.len(), last);
                    if last {
                        break;
                    }
                    tokio::time::sleep(pause).await;
                    pause = pause.saturating_mul(2);
                }
            }
        }
        self.stats.dropped("sink_failed", batch.len());
    }

    async fn expire(&mut self) {
        let Some(retention) = self.retention else {
            return;
        };
        let cutoff = unix_ms(SystemTime::now())
            .saturating_sub(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX));
        match tokio::time::timeout(
            self.options.timeout.saturating_mul(6),
            self.sink.delete_before(cutoff),
        )
        .await
        {
            Ok(Ok(0)) => {}
            Ok(Ok(deleted)) => {
                tracing::info!(deleted, "spend log: records past their retention deleted");
            }
            Ok(Err(e)) => tracing::warn!("spend log: retention not applied: {e}"),
            Err(_) => tracing::warn!("spend log: retention not applied: the sink did not answer"),
        }
    }
}

/// Takes up to `max` more records that are already queued, without waiting.
fn drain(queue: &mut mpsc::Receiver<Record>, batch: &mut Vec<Record>, max: usize) {
    while batch.len() < max {
        match queue.try_recv() {
            Ok(record) => batch.push(record),
            Err(_) => break,
        }
    }
}

/// Write failures, logged at most once per [`ERROR_LOG_EVERY`]: a sink that
/// is down fails every batch, and one line a minute says so.
#[derive(Default)]
struct ErrorLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl ErrorLog {
    fn error(&mut self, error: &SinkError, records: usize, last_attempt: bool) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < ERROR_LOG_EVERY)
        {
            self.suppressed += 1;
            return;
        }
        self.last = Some(now);
        let suppressed = std::mem::take(&mut self.suppressed);
        if last_attempt {
            tracing::error!(
                records,
                suppressed,
                "spend log: batch dropped after its last attempt failed: {error}"
            );
        } else {
            tracing::warn!(
                records,
                suppressed,
                "spend log: write failed, retrying: {error}"
            );
        }
    }
}

/// The report for `query` from the configured spend log, without a running
/// server (`iris usage --since`): the SQLite file read-only, or PostgreSQL.
pub async fn report_from_config(
    settings: &SpendSettings,
    store: &StoreBackend,
    query: &Query,
    currency: &str,
) -> Result<UsageReport, String> {
    let totals = match &settings.backend {
        SpendBackend::Off => return Err(SpendError::Off.to_string()),
        SpendBackend::Sqlite { path } => {
            let Some(path) = sqlite_path(path.as_ref(), store) else {
                return Err(
                    "with store.kind = \"memory\" the spend log lives in the running \
                            server's memory only; ask it with GET /admin/usage"
                        .into(),
                );
            };
            let query = query.clone();
            tokio::task::spawn_blocking(move || -> Result<Vec<report::Totals>, SinkError> {
                match sqlite::SqliteSink::open_read_only(&path)? {
                    Some(sink) => sink.totals_now(&query),
                    None => Ok(Vec::new()),
                }
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("spend log: {e}"))?
        }
        SpendBackend::Postgres { url, ca_file } => {
            let sink = postgres::PostgresSink::new(url, ca_file.as_ref())
                .map_err(|e| format!("spend log: {e}"))?;
            sink.totals(query)
                .await
                .map_err(|e| format!("spend log: {e}"))?
        }
    };
    Ok(UsageReport::new(query, totals, currency))
}

#[cfg(test)]
mod tests;
