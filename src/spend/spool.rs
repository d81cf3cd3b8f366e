//! The spool of a PostgreSQL spend log: records are committed first to a
//! local SQLite table, `spend_spool` (in the SQLite store's file, or a file
//! of its own: see [`super::journal`]), in the same durable step as a
//! SQLite spend log's, then shipped to PostgreSQL in batches by the
//! [`Shipper`]. A batch leaves the spool only once PostgreSQL acknowledged
//! it, and PostgreSQL skips the records it already has (by `record_id`),
//! so a batch sent again after a crash between sending and deleting lands
//! once. What the spool held at startup goes first.
//!
//! A PostgreSQL outage of any length loses nothing the spool has room for
//! (`spend_log.spool_max_records`): the shipper retries with a growing
//! pause, and the backlog shows in `iris_spend_spool_records` and
//! `/readyz`. Past the bound, records are dropped, counted
//! (`iris_spend_log_dropped_total{reason="spool_full"}`) and logged as
//! errors ([`super::journal::Journal::push`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rusqlite::{Connection, params};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::journal::{Backlog, Loud, open_file};
use super::migrations::{self, SPOOL_COMPONENT};
use super::sqlite::{RECORD_COLUMNS, message, migrate, read_record};
use super::{Control, RETENTION_EVERY, Record, Sink, SinkError, Stats, WriterOptions, expire};

/// The spool's file with the memory or Redis store, unless
/// `spend_log.spool_path` names another: in the working directory.
pub const DEFAULT_FILE: &str = "iris-spool.db";

/// The longest pause between two attempts while PostgreSQL refuses.
const MAX_PAUSE: Duration = Duration::from_secs(30);

/// The spool's table, for the shipper: read oldest first, delete once
/// shipped.
pub struct Spool {
    db: Mutex<Connection>,
    path: PathBuf,
}

impl Spool {
    /// Opens (creating and migrating) the spool in `path`, and counts the
    /// records waiting there (blocking).
    pub fn open(path: &Path) -> Result<(Self, u64), SinkError> {
        let mut db = open_file(path)?;
        migrate(&mut db, SPOOL_COMPONENT, migrations::SPOOL)
            .map_err(|e| SinkError(format!("{}: {e}", super::journal::name(path))))?;
        let count: i64 = db
            .query_row("SELECT count(*) FROM spend_spool", [], |row| row.get(0))
            .map_err(|e| SinkError(message(Some(path), &e)))?;
        Ok((
            Self {
                db: Mutex::new(db),
                path: path.to_owned(),
            },
            u64::try_from(count).unwrap_or(0),
        ))
    }

    /// The oldest `limit` records, with their places in the spool.
    pub(super) fn oldest(&self, limit: usize) -> Result<Vec<(i64, Record)>, SinkError> {
        let db = self.db.lock().unwrap_or_else(PoisonError::into_inner);
        let read = || -> rusqlite::Result<Vec<(i64, Record)>> {
            let mut statement = db.prepare_cached(&format!(
                "SELECT seq, {RECORD_COLUMNS} FROM spend_spool ORDER BY seq LIMIT ?1"
            ))?;
            let rows = statement.query_map([i64::try_from(limit).unwrap_or(i64::MAX)], |row| {
                Ok((row.get(0)?, read_record(row, 1)?))
            })?;
            rows.collect()
        };
        read().map_err(|e| SinkError(message(Some(&self.path), &e)))
    }

    /// Deletes the records from `first` to `last` (a shipped batch);
    /// returns how many.
    fn remove(&self, first: i64, last: i64) -> Result<u64, SinkError> {
        let db = self.db.lock().unwrap_or_else(PoisonError::into_inner);
        db.execute(
            "DELETE FROM spend_spool WHERE seq BETWEEN ?1 AND ?2",
            params![first, last],
        )
        .map(|n| n as u64)
        .map_err(|e| SinkError(message(Some(&self.path), &e)))
    }

    /// The records in the spool now.
    fn count(&self) -> Result<u64, SinkError> {
        let db = self.db.lock().unwrap_or_else(PoisonError::into_inner);
        db.query_row("SELECT count(*) FROM spend_spool", [], |row| {
            row.get::<_, i64>(0)
        })
        .map(|n| u64::try_from(n).unwrap_or(0))
        .map_err(|e| SinkError(message(Some(&self.path), &e)))
    }
}

/// Ships the spool to PostgreSQL: a full batch at once, a partial one
/// `flush_ms` after it started to wait, what was there at startup first;
/// retried after a growing pause while PostgreSQL refuses; never dropped.
pub struct Shipper {
    pub spool: Arc<Spool>,
    pub sink: Arc<dyn Sink>,
    pub backlog: Arc<Backlog>,
    pub stats: Arc<Stats>,
    pub options: WriterOptions,
    pub retention: Option<Duration>,
}

impl Shipper {
    pub(super) async fn run(self, mut commands: mpsc::UnboundedReceiver<Control>) {
        let batch_size = self.options.batch_size.max(1);
        let mut errors = Loud::default();
        let mut retention = tokio::time::interval(RETENTION_EVERY);
        retention.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // When a partial batch goes anyway; now for what a restart found.
        let mut due = (self.backlog.records() > 0).then(Instant::now);
        let mut pause = self.options.backoff;
        loop {
            let waiting = self.backlog.records();
            let go = waiting >= batch_size as u64
                || (waiting > 0 && due.is_some_and(|due| due <= Instant::now()));
            if go {
                match self.ship(batch_size).await {
                    Ok(()) => {
                        pause = self.options.backoff;
                        if self.backlog.records() == 0 {
                            due = None;
                        }
                    }
                    Err(e) => {
                        self.failed(&e, &mut errors);
                        tokio::select! {
                            biased;
                            command = commands.recv() => match command {
                                // PostgreSQL refuses: a flush cannot finish
                                // (its waiter is told so by the dropped ack).
                                Some(Control::Flush(_)) => {}
                                Some(Control::Shutdown(_)) | None => return,
                            },
                            () = tokio::time::sleep(pause) => {}
                        }
                        pause = pause.saturating_mul(2).min(MAX_PAUSE);
                    }
                }
                continue;
            }
            if waiting > 0 && due.is_none() {
                due = Some(Instant::now() + self.options.flush);
            }
            let deadline = due.unwrap_or_else(|| Instant::now() + RETENTION_EVERY);
            tokio::select! {
                biased;
                command = commands.recv() => match command {
                    Some(Control::Flush(ack)) => {
                        if self.drain(batch_size, &mut errors).await {
                            due = None;
                            let _ = ack.send(());
                        }
                    }
                    Some(Control::Shutdown(ack)) => {
                        if self.drain(batch_size, &mut errors).await {
                            let _ = ack.send(());
                        }
                        return;
                    }
                    None => return,
                },
                () = self.backlog.added.notified() => {}
                () = tokio::time::sleep_until(deadline), if due.is_some() => {}
                _ = retention.tick() => {
                    expire(&*self.sink, self.retention, self.options.timeout).await;
                }
            }
        }
    }

    /// Ships everything in the spool now; false at the first failure.
    async fn drain(&self, batch_size: usize, errors: &mut Loud) -> bool {
        while self.backlog.records() > 0 {
            if let Err(e) = self.ship(batch_size).await {
                self.failed(&e, errors);
                return false;
            }
        }
        true
    }

    /// The oldest batch to PostgreSQL, then out of the spool.
    async fn ship(&self, batch_size: usize) -> Result<(), SinkError> {
        let spool = Arc::clone(&self.spool);
        let rows = blocking(move || spool.oldest(batch_size)).await?;
        let (Some(&(first, _)), Some(&(last, _))) = (rows.first(), rows.last()) else {
            // The count ran ahead of the table (not expected): believe the table.
            let spool = Arc::clone(&self.spool);
            self.backlog.set(blocking(move || spool.count()).await?);
            return Ok(());
        };
        let batch: Arc<[Record]> = rows.into_iter().map(|(_, record)| record).collect();
        let records = batch.len();
        match tokio::time::timeout(self.options.timeout, self.sink.write(batch)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(SinkError(format!(
                    "no answer within {} ms",
                    self.options.timeout.as_millis()
                )));
            }
        }
        self.stats.written(records);
        if self.backlog.failing() {
            tracing::info!(
                waiting = self.backlog.records(),
                "spend log: PostgreSQL takes records again; the spool drains"
            );
            self.backlog.set_failing(false);
        }
        // A crash from here to the delete sends the batch again after the
        // restart: PostgreSQL skips the records it has.
        let spool = Arc::clone(&self.spool);
        let removed = blocking(move || spool.remove(first, last)).await?;
        self.backlog.remove(removed);
        Ok(())
    }

    fn failed(&self, error: &SinkError, errors: &mut Loud) {
        self.backlog.set_failing(true);
        crate::metrics::SPEND_LOG_WRITE_FAILURES
            .counter(&[])
            .increment(1);
        if let Some(suppressed) = errors.due() {
            tracing::error!(
                waiting = self.backlog.records(),
                suppressed,
                "spend log: PostgreSQL did not take a batch; the records wait in the spool \
                 and are sent again: {error}"
            );
        }
    }
}

/// Runs `work` on the blocking pool.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, SinkError> + Send + 'static,
) -> Result<T, SinkError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(SinkError(format!("spend spool: {e}"))))
}
