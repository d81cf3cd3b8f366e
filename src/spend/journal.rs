//! The spend log's durable step: a finished request's record is committed
//! to a local SQLite table (the log's own, or the spool's on the way to
//! PostgreSQL) before its response ends, so a `kill -9` after the client
//! has its answer cannot lose the record.
//!
//! Records wait in a [`Journal`] for the next commit, which takes every
//! record waiting then (a group commit: under load one write serves many
//! responses). Where the table is in the SQLite budget store's file, the
//! records ride in the store's own transactions ([`Rider`]), so a response
//! waits for one commit that holds both its settlement and its record;
//! elsewhere the journal commits them itself ([`OwnFile`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::sqlite::{Table, describe, insert_into, message, with_values};
use super::{Record, SinkError, Stats};
use crate::budget::store::{Frame, Load, Rider, SqliteStore, StoreError, StoreFuture};

/// How often records nobody waits for (a failed commit's, a client that
/// hung up) are committed at the latest.
pub const COMMIT_EVERY: Duration = Duration::from_secs(1);

/// Records held in memory (their frames written) past which the store's
/// write-ahead log is folded into the table at once.
const FOLD_AT_RECORDS: usize = 1024;

/// Loud errors are logged at most this often (each line says how many
/// were not logged since).
const LOUD_EVERY: Duration = Duration::from_secs(60);

/// How many records the spool holds, for the shipper, the gauge and
/// `/readyz`.
#[derive(Default)]
pub struct Backlog {
    records: AtomicU64,
    /// Told when a commit added records.
    pub added: Notify,
    /// The last attempt to ship a batch failed.
    failing: AtomicBool,
}

impl Backlog {
    pub fn records(&self) -> u64 {
        self.records.load(Ordering::Relaxed)
    }

    pub fn set(&self, records: u64) {
        self.records.store(records, Ordering::Relaxed);
        self.publish();
    }

    fn add(&self, records: u64) {
        self.records.fetch_add(records, Ordering::Relaxed);
        self.publish();
        self.added.notify_one();
    }

    pub fn remove(&self, records: u64) {
        let _ = self
            .records
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(records))
            });
        self.publish();
    }

    pub fn failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::Relaxed);
    }

    fn publish(&self) {
        #[expect(
            clippy::cast_precision_loss,
            reason = "a gauge: exact below 2^53 records"
        )]
        crate::metrics::SPEND_SPOOL_RECORDS
            .gauge(&[])
            .set(self.records() as f64);
    }
}

/// Records waiting for their commit, in the order they came.
pub struct Journal {
    table: Table,
    waiting: Mutex<Waiting>,
    /// Records taken by a commit under way (counted against the spool's
    /// bound until they are in it).
    committing: AtomicU64,
    /// The most records that may wait (a disk that refuses every write).
    capacity: usize,
    stats: Arc<Stats>,
    /// The spool's backlog and bound (`spool_max_records`).
    spool: Option<(Arc<Backlog>, u64)>,
    /// Records refused for a full spool, logged loudly but not per record.
    overflow: Mutex<Loud>,
}

/// The records waiting, the first `in_log` of which the store's
/// write-ahead log already holds (always 0 for a journal of its own file).
#[derive(Default)]
struct Waiting {
    records: Vec<Record>,
    in_log: usize,
}

impl Journal {
    pub fn new(
        table: Table,
        capacity: usize,
        stats: Arc<Stats>,
        spool: Option<(Arc<Backlog>, u64)>,
    ) -> Arc<Self> {
        Arc::new(Self {
            table,
            waiting: Mutex::new(Waiting::default()),
            committing: AtomicU64::new(0),
            capacity: capacity.max(1),
            stats,
            spool,
            overflow: Mutex::new(Loud::default()),
        })
    }

    /// Adds `record` to the next commit, never waiting; a record that does
    /// not fit (the spool is full, or commits keep failing) is dropped,
    /// counted and logged.
    pub fn push(&self, record: Record) {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((backlog, max)) = &self.spool
            && backlog
                .records()
                .saturating_add(self.committing.load(Ordering::SeqCst))
                .saturating_add(waiting.records.len() as u64)
                >= *max
        {
            drop(waiting);
            self.stats.dropped("spool_full", 1);
            let mut overflow = self.overflow.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(suppressed) = overflow.due() {
                tracing::error!(
                    spool_max_records = *max,
                    suppressed,
                    "spend log: the spool is full (PostgreSQL has not taken its records): \
                     a record was dropped"
                );
            }
            return;
        }
        if waiting.records.len() >= self.capacity {
            drop(waiting);
            self.stats.dropped("queue_full", 1);
            return;
        }
        waiting.records.push(record);
    }

    /// Records waiting now.
    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        self.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .records
            .len()
    }

    /// Takes the records waiting (with `in_log_only`, those the store's
    /// log holds), for one transaction.
    fn take_batch(self: Arc<Self>, in_log_only: bool) -> Option<Batch> {
        let (records, in_log) = {
            let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
            let count = if in_log_only {
                waiting.in_log
            } else {
                waiting.records.len()
            };
            // Counted as committing before they leave `waiting`, so a push
            // never sees them in neither.
            self.committing.fetch_add(count as u64, Ordering::SeqCst);
            let in_log = count.min(waiting.in_log);
            waiting.in_log -= in_log;
            (waiting.records.drain(..count).collect::<Vec<_>>(), in_log)
        };
        Some(Batch {
            taken: records.len() as u64,
            records,
            in_log,
            journal: self,
        })
        .filter(|batch| !batch.records.is_empty())
    }
}

impl Rider for Journal {
    fn journal(&self, frame: &mut Frame) -> rusqlite::Result<bool> {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        let Waiting { records, in_log } = &mut *waiting;
        for record in &records[*in_log..] {
            with_values(record, |values| {
                frame.row(self.table.name(), Table::COLUMNS, values)
            })?;
            *in_log += 1;
        }
        // Folded into the table now rather than at the next periodic
        // flush: the records in memory stay few under any load (a second
        // of a busy server's would be tens of megabytes), and none is ever
        // dropped for want of room.
        Ok(records.len() >= (self.capacity / 2).min(FOLD_AT_RECORDS))
    }

    fn take(self: Arc<Self>, in_log_only: bool) -> Option<Box<dyn Load>> {
        self.take_batch(in_log_only)
            .map(|batch| Box::new(batch) as Box<dyn Load>)
    }
}

/// The records of one transaction.
struct Batch {
    records: Vec<Record>,
    /// How many of the first are in the store's write-ahead log.
    in_log: usize,
    /// How many were taken: no longer committing once the batch is gone.
    taken: u64,
    journal: Arc<Journal>,
}

impl Drop for Batch {
    fn drop(&mut self) {
        self.journal
            .committing
            .fetch_sub(self.taken, Ordering::SeqCst);
    }
}

impl Load for Batch {
    fn write(&self, transaction: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
        insert_into(transaction, self.journal.table, &self.records)
    }

    fn committed(self: Box<Self>) {
        let records = self.records.len();
        match &self.journal.spool {
            // In the spool: written once PostgreSQL has them.
            Some((backlog, _)) => backlog.add(records as u64),
            None => self.journal.stats.written(records),
        }
    }

    fn failed(mut self: Box<Self>) {
        // Back in front of what came since, for the next commit.
        let mut records = std::mem::take(&mut self.records);
        let mut waiting = self
            .journal
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        records.append(&mut waiting.records);
        waiting.records = records;
        waiting.in_log += self.in_log;
    }
}

/// Who commits a journal.
pub enum Commit {
    /// The SQLite budget store, in its own transactions (the journal rides
    /// with them).
    Store(Arc<SqliteStore>),
    /// A file of the journal's own.
    Own(Arc<OwnFile>),
}

impl Commit {
    /// Resolves once every record pushed before the call is committed.
    pub fn committed(&self) -> StoreFuture<()> {
        match self {
            Self::Store(store) => crate::budget::store::Store::persisted(&**store),
            Self::Own(own) => own.committed(),
        }
    }
}

/// A journal's own file: one connection, one commit at a time, each taking
/// every record waiting (a group commit).
pub struct OwnFile {
    journal: Arc<Journal>,
    db: Mutex<Connection>,
    /// One commit at a time: a waiter whose records a commit under way
    /// took waits for it, then finds nothing left.
    committing: tokio::sync::Mutex<()>,
    path: PathBuf,
    errors: Mutex<Loud>,
}

impl OwnFile {
    /// Opens `path` (already migrated) for `journal`'s commits, and commits
    /// every [`COMMIT_EVERY`] what nobody waited for.
    pub fn open(journal: Arc<Journal>, path: &Path) -> Result<Arc<Self>, SinkError> {
        let db = open_file(path)?;
        let own = Arc::new(Self {
            journal,
            db: Mutex::new(db),
            committing: tokio::sync::Mutex::new(()),
            path: path.to_owned(),
            errors: Mutex::new(Loud::default()),
        });
        spawn_committer(Arc::downgrade(&own));
        Ok(own)
    }

    /// Every record pushed before the call, committed. The commit runs as a
    /// task of its own, so a waiter that goes away (its client hung up)
    /// never leaves a batch half-reported. Nothing is spawned unless polled.
    pub fn committed(self: &Arc<Self>) -> StoreFuture<()> {
        let own = Arc::clone(self);
        Box::pin(async move {
            tokio::spawn(own.commit())
                .await
                .unwrap_or_else(|e| Err(StoreError(format!("spend log writer failed: {e}"))))
        })
    }

    async fn commit(self: Arc<Self>) -> Result<(), StoreError> {
        let _one_at_a_time = self.committing.lock().await;
        let Some(batch) = Arc::clone(&self.journal).take_batch(false) else {
            return Ok(());
        };
        let this = Arc::clone(&self);
        let (result, batch) = tokio::task::spawn_blocking(move || {
            let result = this.write(&batch);
            (result, batch)
        })
        .await
        .map_err(|e| StoreError(format!("spend log writer failed: {e}")))?;
        match result {
            Ok(()) => {
                Box::new(batch).committed();
                Ok(())
            }
            Err(e) => {
                Box::new(batch).failed();
                let error = message(Some(&self.path), &e);
                let mut errors = self.errors.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(suppressed) = errors.due() {
                    tracing::error!(suppressed, "spend log: records not committed: {error}");
                }
                Err(StoreError(format!("spend log: {error}")))
            }
        }
    }

    fn write(&self, batch: &Batch) -> rusqlite::Result<()> {
        let mut db = self.db.lock().unwrap_or_else(PoisonError::into_inner);
        let transaction = db.transaction()?;
        batch.write(&transaction)?;
        transaction.commit()
    }
}

impl Drop for OwnFile {
    /// A last commit when the journal goes away (after the shutdown's this
    /// finds nothing to do).
    fn drop(&mut self) {
        if let Some(batch) = Arc::clone(&self.journal).take_batch(false) {
            match self.write(&batch) {
                Ok(()) => Box::new(batch).committed(),
                Err(e) => tracing::error!(
                    records = batch.records.len(),
                    "spend log: records not committed at exit: {}",
                    message(Some(&self.path), &e)
                ),
            }
        }
    }
}

fn spawn_committer(own: Weak<OwnFile>) {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(COMMIT_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            ticks.tick().await;
            let Some(own) = own.upgrade() else { break };
            // A failure is logged by the commit, and retried next tick.
            let _ = own.commit().await;
        }
    });
}

/// A connection to a local file Iris writes: WAL (readers never wait for
/// the writer), `synchronous = NORMAL` (a commit survives a process
/// crash; a power cut may lose the last ones).
pub fn open_file(path: &Path) -> Result<Connection, SinkError> {
    let error = |e: rusqlite::Error| SinkError(message(Some(path), &e));
    let db = Connection::open(path).map_err(error)?;
    db.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000;",
    )
    .map_err(error)?;
    Ok(db)
}

/// Says where a file is, for messages.
pub fn name(path: &Path) -> String {
    describe(Some(path))
}

/// An error worth a loud line, logged at most once per [`LOUD_EVERY`].
#[derive(Default)]
pub struct Loud {
    last: Option<Instant>,
    suppressed: u64,
}

impl Loud {
    /// `Some(lines not logged since the last)` when a line is due now.
    pub fn due(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < LOUD_EVERY)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}
