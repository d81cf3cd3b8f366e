//! The spend log: one [`Record`] per finished request (chat completions
//! and embeddings, errors included), for "who used what, on which model, this month".
//!
//! A record is committed to a local SQLite table before its response ends
//! ([`journal`]): with a SQLite log, the `spend_log` table itself (in the
//! budget store's file, in the same transaction as the settlement, or in
//! `spend_log.path`); with PostgreSQL, a spool ([`spool`]) that a
//! background shipper sends on in batches, so an outage or a `kill -9`
//! loses nothing. Commits are group commits: every record waiting at that
//! moment goes in one transaction, so under load one write serves many
//! responses. Only the memory store's log, in memory and gone at exit
//! anyway, is still written behind: a request puts its record in a bounded
//! queue and goes on, and a background writer takes records off it in
//! batches (`batch_size` records, or whatever came within `flush_ms`).
//!
//! Each sink creates and migrates its own tables ([`migrations`]), and
//! answers the aggregation behind `iris usage --since` and
//! `GET /admin/usage` ([`report`]). Records older than `retention_days`
//! are deleted every hour.

pub mod journal;
pub mod migrations;
pub mod postgres;
pub mod report;
pub mod spool;
pub mod sqlite;

use std::borrow::Cow;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::budget::money::Money;
use crate::budget::store::{SqliteStore, StoreFuture};
use crate::budget::{Charged, StoreBackend};
use crate::facts::RequestFacts;
use crate::ids::Ids;
use crate::secret::Secret;
use crate::tls::PrivateCa;
use journal::{Backlog, Commit, Journal, OwnFile};
pub use report::{Dimension, Query, QueryError, UsageReport};
use sqlite::Table;

/// One finished chat completion, as the contract lists its fields: the
/// request's facts (its id, client and team, model, upstream and the
/// upstream's name for the model, images and their bytes, stream,
/// attempts) and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The record's own id ([`new_record_id`]): unique, so a record sent
    /// twice (a batch whose acknowledgement a crash lost) is kept once,
    /// where `request_id` may repeat (a client's `x-request-id`).
    pub record_id: String,
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
    /// ([`crate::openai::Api::as_str`]; owned when read back from the
    /// spool, as a newer Iris may have written another).
    pub endpoint: Cow<'static, str>,
    /// From the request's arrival to the first byte of the upstream's
    /// answer (or of a cache hit's replay) going to the client; none when
    /// Iris answered with an error of its own.
    pub ttfb_ms: Option<u64>,
    /// From the request's arrival to the end of its response body.
    pub total_ms: u64,
}

impl Record {
    /// Whether the answer came from the response cache (it cost nothing).
    pub fn cache_hit(&self) -> bool {
        self.facts.cache == Some(crate::facts::CacheOutcome::Hit)
    }

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
            record_id: new_record_id(),
            at_ms: unix_ms(SystemTime::now()),
            endpoint: Cow::Borrowed(facts.api.as_str()),
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

/// A new [`Record::record_id`]: a random prefix chosen once per process
/// (64 bits: instances and restarts never share one), then a counter.
pub fn new_record_id() -> String {
    static IDS: Ids = Ids::new("", 8, 1);
    IDS.next()
}

/// A client's address as the log's `client_addr` holds it: as `Display`
/// writes it, an IPv4 address without the formatting machinery (which
/// cost the writer 7% of an insert), on the stack (an insert compares a
/// record's columns with the previous record's, so it is made twice).
pub fn address_text(addr: std::net::IpAddr) -> AddressText {
    let mut text = AddressText {
        bytes: [0; AddressText::MAX],
        len: 0,
    };
    let std::net::IpAddr::V4(v4) = addr else {
        use std::io::Write as _;
        let mut rest = &mut text.bytes[..];
        // At most 39 characters (45 with an IPv4 tail): it fits.
        let _ = write!(rest, "{addr}");
        let left = rest.len();
        text.len = AddressText::MAX - left;
        return text;
    };
    let mut push = |byte: u8| {
        text.bytes[text.len] = byte;
        text.len += 1;
    };
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            push(b'.');
        }
        if octet >= 100 {
            push(b'0' + octet / 100);
        }
        if octet >= 10 {
            push(b'0' + octet / 10 % 10);
        }
        push(b'0' + octet % 10);
    }
    text
}

/// [`address_text`]'s text.
#[derive(Clone, Copy)]
pub struct AddressText {
    bytes: [u8; Self::MAX],
    len: usize,
}

impl AddressText {
    const MAX: usize = 48;

    pub fn as_str(&self) -> &str {
        // Written from ASCII digits, dots, colons and hex only.
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or_default()
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
                record_id: new_record_id(),
                at_ms,
                endpoint: Cow::Borrowed(self.facts.api.as_str()),
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
    /// database's certificate (`sslmode=verify-full`). Records wait in a
    /// local spool until PostgreSQL has them: in `spool` if set, else in
    /// the SQLite store's file, else in [`spool::DEFAULT_FILE`].
    Postgres {
        url: Secret,
        ca_file: Option<PrivateCa>,
        spool: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendSettings {
    pub backend: SpendBackend,
    /// Records older than this are deleted; `None` keeps them forever.
    pub retention: Option<Duration>,
    pub writer: WriterOptions,
}

/// How records are batched, on their way to the local table and from the
/// spool to PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterOptions {
    /// Records waiting to be written (committed, or written behind); more
    /// are dropped (and counted).
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
    /// The most records the spool holds (PostgreSQL): more are dropped
    /// (and counted).
    pub spool_max_records: u64,
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
            spool_max_records: 1_000_000,
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
    /// Writes `batch` whole, or nothing. A record the sink has already
    /// (by `record_id`: a batch sent again) is kept once, and is no error.
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
        SpendBackend::Postgres { url, ca_file, .. } => Some(Arc::new(
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
/// journal (or queue) and background task.
#[derive(Clone, Default)]
pub struct SpendLog {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    way: Way,
    stats: Arc<Stats>,
    /// The writer's or the shipper's commands.
    control: Option<mpsc::UnboundedSender<Control>>,
    sink: Arc<dyn Sink>,
    /// The writer or the shipper.
    task: Mutex<Option<JoinHandle<()>>>,
}

/// How a record is kept until it is durable.
enum Way {
    /// Queued and written behind: the memory store's log, in memory.
    Behind(mpsc::Sender<Record>),
    /// Committed to a local table before the response ends.
    Committed {
        journal: Arc<Journal>,
        commit: Commit,
        /// The spool's, with PostgreSQL.
        backlog: Option<Arc<Backlog>>,
    },
}

enum Control {
    /// Write everything queued so far, then answer.
    Flush(oneshot::Sender<()>),
    /// Write everything queued, then stop.
    Shutdown(oneshot::Sender<()>),
}

/// A future that is already done.
fn done() -> StoreFuture<()> {
    Box::pin(std::future::ready(Ok(())))
}

impl SpendLog {
    /// A spend log that keeps nothing.
    pub fn off() -> Self {
        Self::default()
    }

    /// Opens the configured log beside the budget `store` (`sqlite`: the
    /// SQLite store, whose transactions the records ride in when they go
    /// in its file), and starts what it runs in the background.
    pub async fn open(
        settings: &SpendSettings,
        store: &StoreBackend,
        sqlite: Option<&Arc<SqliteStore>>,
    ) -> Result<Self, String> {
        let options = settings.writer;
        let stats = Arc::new(Stats::default());
        match &settings.backend {
            SpendBackend::Off => Ok(Self::off()),
            SpendBackend::Sqlite { path } => {
                let Some(sink) = open_sink(settings, store).await? else {
                    return Ok(Self::off());
                };
                let Some(file) = sqlite_path(path.as_ref(), store) else {
                    // In memory: nothing survives a crash to be kept for.
                    return Ok(Self::start(sink, options, settings.retention));
                };
                let journal =
                    Journal::new(Table::Log, options.queue_capacity, Arc::clone(&stats), None);
                let commit = beside(journal.clone(), &file, sqlite)?;
                spawn_retention(Arc::downgrade(&sink), settings.retention, options.timeout);
                Ok(Self::with(
                    Way::Committed {
                        journal,
                        commit,
                        backlog: None,
                    },
                    stats,
                    sink,
                    None,
                ))
            }
            SpendBackend::Postgres {
                url,
                ca_file,
                spool,
            } => {
                let sink: Arc<dyn Sink> = Arc::new(
                    postgres::PostgresSink::new(url, ca_file.as_ref())
                        .map_err(|e| format!("spend log: {e}"))?,
                );
                let file = spool
                    .clone()
                    .or_else(|| sqlite.map(|store| store.path().to_owned()))
                    .unwrap_or_else(|| PathBuf::from(spool::DEFAULT_FILE));
                let opening = file.clone();
                let (spooled, waiting) =
                    tokio::task::spawn_blocking(move || spool::Spool::open(&opening))
                        .await
                        .map_err(|e| format!("spend log: {e}"))?
                        .map_err(|e| format!("spend log: {e}"))?;
                let backlog = Arc::new(Backlog::default());
                backlog.set(waiting);
                if waiting > 0 {
                    tracing::info!(
                        records = waiting,
                        spool = %file.display(),
                        "spend log: records left in the spool go to PostgreSQL first"
                    );
                }
                let journal = Journal::new(
                    Table::Spool,
                    options.queue_capacity,
                    Arc::clone(&stats),
                    Some((Arc::clone(&backlog), options.spool_max_records.max(1))),
                );
                let commit = beside(journal.clone(), &file, sqlite)?;
                let (control, commands) = mpsc::unbounded_channel();
                let shipper = spool::Shipper {
                    spool: Arc::new(spooled),
                    sink: Arc::clone(&sink),
                    backlog: Arc::clone(&backlog),
                    stats: Arc::clone(&stats),
                    options,
                    retention: settings.retention,
                };
                let task = tokio::spawn(shipper.run(commands));
                let log = Self::with(
                    Way::Committed {
                        journal,
                        commit,
                        backlog: Some(backlog),
                    },
                    stats,
                    sink,
                    Some(control),
                );
                log.set_task(task);
                Ok(log)
            }
        }
    }

    fn with(
        way: Way,
        stats: Arc<Stats>,
        sink: Arc<dyn Sink>,
        control: Option<mpsc::UnboundedSender<Control>>,
    ) -> Self {
        Self {
            inner: Some(Arc::new(Inner {
                way,
                stats,
                control,
                sink,
                task: Mutex::new(None),
            })),
        }
    }

    fn set_task(&self, task: JoinHandle<()>) {
        if let Some(inner) = &self.inner {
            *inner.task.lock().unwrap_or_else(PoisonError::into_inner) = Some(task);
        }
    }

    /// Starts a writer behind for `sink` (the in-memory log; tests bring
    /// their own sinks).
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
        let log = Self::with(Way::Behind(records), stats, sink, Some(control));
        log.set_task(task);
        log
    }

    pub fn is_on(&self) -> bool {
        self.inner.is_some()
    }

    /// Whether records are committed before a response ends (every log
    /// but the one in memory, written behind).
    pub fn commits(&self) -> bool {
        matches!(
            self.inner.as_deref().map(|inner| &inner.way),
            Some(Way::Committed { .. })
        )
    }

    /// Adds `record` to the next commit (or the writer's queue), never
    /// waiting: what does not fit is dropped and counted
    /// (`iris_spend_log_dropped_total`). [`Self::committed`] says when it
    /// is durable.
    pub fn record(&self, record: Record) {
        let Some(inner) = &self.inner else { return };
        match &inner.way {
            Way::Behind(records) => match records.try_send(record) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => inner.stats.dropped("queue_full", 1),
                Err(mpsc::error::TrySendError::Closed(_)) => inner.stats.dropped("stopped", 1),
            },
            Way::Committed { journal, .. } => journal.push(record),
        }
    }

    /// Resolves once every record taken before the call is committed (at
    /// once for a log written behind). A response's end waits for it.
    pub fn committed(&self) -> StoreFuture<()> {
        match self.inner.as_deref().map(|inner| &inner.way) {
            Some(Way::Committed { commit, .. }) => commit.committed(),
            _ => done(),
        }
    }

    /// [`Self::committed`], for a caller that has just waited for the SQLite
    /// store's `persisted` after recording: where the records ride in the
    /// store's transactions, that commit held them, and there is nothing
    /// more to wait for.
    pub fn committed_with_settlement(&self) -> StoreFuture<()> {
        match self.inner.as_deref().map(|inner| &inner.way) {
            Some(Way::Committed {
                commit: Commit::Own(own),
                ..
            }) => own.committed(),
            _ => done(),
        }
    }

    /// Records written and dropped by this process so far (with PostgreSQL,
    /// written: acknowledged by it).
    pub fn counts(&self) -> (u64, u64) {
        self.inner.as_ref().map_or((0, 0), |inner| {
            (
                inner.stats.written.load(Ordering::Relaxed),
                inner.stats.dropped.load(Ordering::Relaxed),
            )
        })
    }

    /// With PostgreSQL: the records waiting in the spool, and whether the
    /// last attempt to ship some failed.
    pub fn backlog(&self) -> Option<(u64, bool)> {
        match self.inner.as_deref().map(|inner| &inner.way) {
            Some(Way::Committed {
                backlog: Some(backlog),
                ..
            }) => Some((backlog.records(), backlog.failing())),
            _ => None,
        }
    }

    /// Waits (at most `wait`) until every record taken before the call is
    /// written (with PostgreSQL: there) or dropped. False if that did not
    /// happen in time (or PostgreSQL refused).
    pub async fn flush(&self, wait: Duration) -> bool {
        tokio::time::timeout(wait, async {
            if let Err(e) = self.committed().await {
                tracing::error!("spend log: {e}");
                return false;
            }
            self.command(Control::Flush).await
        })
        .await
        .unwrap_or(false)
    }

    /// At shutdown: commits or writes what waits (at most `wait`; with
    /// PostgreSQL, ships what it can: the rest stays in the spool for the
    /// next start) and stops the background task; records that come later
    /// are dropped and counted.
    pub async fn shutdown(&self, wait: Duration) -> bool {
        let Some(inner) = &self.inner else {
            return true;
        };
        let done = self.flush_then_stop(wait).await;
        let task = inner
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            if done {
                let _ = tokio::time::timeout(wait, task).await;
            } else {
                // The sink is stuck: what is still queued behind is lost
                // (a spool keeps it).
                task.abort();
            }
        }
        if let Some((waiting, _)) = self.backlog()
            && waiting > 0
        {
            tracing::warn!(
                records = waiting,
                "spend log: records wait in the spool for PostgreSQL; the next start sends them"
            );
            return true;
        }
        done
    }

    async fn flush_then_stop(&self, wait: Duration) -> bool {
        tokio::time::timeout(wait, async {
            if let Err(e) = self.committed().await {
                tracing::error!("spend log: {e}");
            }
            self.command(Control::Shutdown).await
        })
        .await
        .unwrap_or(false)
    }

    /// Sends the background task a command and waits for its answer (true
    /// without a task, or once it has stopped: nothing waits for it then).
    async fn command(&self, make: fn(oneshot::Sender<()>) -> Control) -> bool {
        let Some(control) = self.inner.as_ref().and_then(|inner| inner.control.as_ref()) else {
            return true;
        };
        let (ack, done) = oneshot::channel();
        if control.send(make(ack)).is_err() {
            return true;
        }
        done.await.is_ok()
    }

    /// The totals `query` asks for, from the sink (a log written behind or
    /// through a spool: at most `flush_ms` behind, or the spool's backlog).
    pub async fn totals(&self, query: &Query) -> Result<Vec<report::Totals>, SpendError> {
        let inner = self.inner.as_ref().ok_or(SpendError::Off)?;
        if let Way::Committed {
            commit: Commit::Store(store),
            ..
        } = &inner.way
        {
            // The last second of records may be in the store's write-ahead
            // log only: folded into the table first. (A failure is the
            // store's to report; the totals are read regardless.)
            let _ = crate::budget::store::Store::flush(&**store).await;
        }
        Ok(inner.sink.totals(query).await?)
    }

    /// The sink itself, if the log is on.
    pub fn sink(&self) -> Option<&Arc<dyn Sink>> {
        self.inner.as_ref().map(|inner| &inner.sink)
    }
}

/// Who commits `journal` into `file`: the SQLite store when it is the
/// store's file (the records ride in its transactions), else the journal
/// itself.
fn beside(
    journal: Arc<Journal>,
    file: &Path,
    sqlite: Option<&Arc<SqliteStore>>,
) -> Result<Commit, String> {
    match sqlite {
        Some(store) if store.path() == file => {
            store.carry(journal);
            Ok(Commit::Store(Arc::clone(store)))
        }
        _ => Ok(Commit::Own(
            OwnFile::open(journal, file).map_err(|e| format!("spend log: {e}"))?,
        )),
    }
}

/// Deletes records past their retention at startup and every hour, until
/// the sink is gone.
fn spawn_retention(
    sink: std::sync::Weak<dyn Sink>,
    retention: Option<Duration>,
    timeout: Duration,
) {
    if retention.is_none() {
        return;
    }
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(RETENTION_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let Some(sink) = sink.upgrade() else { break };
            expire(&*sink, retention, timeout).await;
        }
    });
}

/// Deletes the records older than `retention` from `sink`.
async fn expire(sink: &dyn Sink, retention: Option<Duration>, timeout: Duration) {
    let Some(retention) = retention else {
        return;
    };
    let cutoff = unix_ms(SystemTime::now())
        .saturating_sub(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX));
    match tokio::time::timeout(timeout.saturating_mul(6), sink.delete_before(cutoff)).await {
        Ok(Ok(0)) => {}
        Ok(Ok(deleted)) => {
            tracing::info!(deleted, "spend log: records past their retention deleted");
        }
        Ok(Err(e)) => tracing::warn!("spend log: retention not applied: {e}"),
        Err(_) => tracing::warn!("spend log: retention not applied: the sink did not answer"),
    }
}

/// What the metrics count, also kept for [`SpendLog::counts`].
#[derive(Default)]
pub struct Stats {
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
        // When the batch being collected must be written at the latest: one
        // timer, set when a batch starts (not a new one per record).
        let mut due = false;
        let due_timer = tokio::time::sleep(RETENTION_EVERY);
        tokio::pin!(due_timer);
        let mut retention = tokio::time::interval(RETENTION_EVERY);
        retention.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                command = commands.recv() => match command {
                    Some(Control::Flush(ack)) => {
                        drain(&mut queue, &mut batch, usize::MAX);
                        self.write_all(&mut batch, batch_size).await;
                        due = false;
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
                        due = false;
                    } else if !due {
                        due_timer.as_mut().reset(Instant::now() + self.options.flush);
                        due = true;
                    }
                }
                () = &mut due_timer, if due => {
                    self.write_all(&mut batch, batch_size).await;
                    due = false;
                }
                _ = retention.tick() => self.expire().await,
            }
        }
    }

    /// Writes `batch` in chunks of at most `size`, emptying it. The records
    /// are moved out, so `batch` keeps room for one batch (it was replaced
    /// by an empty vector, which then grew a doubling at a time); the room
    /// a flush of a long queue took is given back.
    async fn write_all(&mut self, batch: &mut Vec<Record>, size: usize) {
        while !batch.is_empty() {
            let chunk: Arc<[Record]> = batch.drain(..batch.len().min(size)).collect();
            self.write(chunk).await;
        }
        batch.shrink_to(size);
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
        expire(&*self.sink, self.retention, self.options.timeout).await;
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
        SpendBackend::Postgres { url, ca_file, .. } => {
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
