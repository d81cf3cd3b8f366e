//! The embedded store (the default): a [`MemoryStore`] is the authoritative
//! state, so reserving never waits on the disk. Before a response's last
//! byte ([`Store::persisted`]) the states its settlement changed go to the
//! store's write-ahead log ([`wal`]: one small `write(2)`, no commit); a
//! background task folds the log into the SQLite file every second (with
//! every other change: reservations, releases) and once more at shutdown.
//! At startup the log is replayed into the file, and the file loaded back.
//!
//! So neither a restart nor a crash (`kill -9`) loses the charge of a
//! response whose client received it complete. A crash loses at most the
//! last second of other changes: a request in flight then is charged its
//! whole reservation if a write caught it, else nothing; a failed request's
//! release may be lost (it stays charged its reservation). Both the log and
//! SQLite's WAL with `synchronous = NORMAL` are durable across process
//! crashes; a power cut may lose the last writes.
//!
//! Rows of another kind can ride with the settlements ([`Rider`]): the
//! spend log's records go in the same log frames and the same SQLite
//! transactions as the settlements they belong to, so a crash keeps both or
//! neither. Should a write to the log fail (a full disk), the log is off
//! until a restart and every response waits for a SQLite commit instead,
//! as a group commit: one transaction serves every response waiting then.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};

use super::wal::{self, Frame, Item};
use super::{MemoryStore, Parties, Reserved, Store, StoreError, StoreFuture, ready};
use crate::alerts::{AlertClaims, ClaimError, ClaimFuture};
use crate::budget::window::{Bucket, Calendar, Charge, ClientState, Hold, Snapshot};
use crate::budget::{Account, Limits};

/// One row per account; `client` holds its [`Account::key`] (the column
/// kept its name from when clients were the only kind).
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS budget_state (
    client       TEXT PRIMARY KEY NOT NULL,
    requests_tat INTEGER NOT NULL,  -- Unix ns: when the requests-per-minute bucket is empty
    tokens_tat   INTEGER NOT NULL,  -- Unix ns: when the tokens-per-minute bucket is empty
    day          INTEGER NOT NULL,  -- days since 1970-01-01 (UTC)
    day_used     INTEGER NOT NULL,
    month        INTEGER NOT NULL,  -- year * 12 + month - 1 (UTC)
    month_used   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL   -- Unix seconds of the write
) STRICT;
CREATE TABLE IF NOT EXISTS store_meta (
    key          TEXT PRIMARY KEY NOT NULL,
    value        INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS alert_claims (
    key          TEXT PRIMARY KEY NOT NULL,  -- the alert's subject, window, threshold and period
    expires_at   INTEGER NOT NULL   -- Unix seconds: the claim is forgotten after this
) STRICT;
";

/// Columns added since the table was first shipped, each with the value
/// an older row means (no money spent), added to a file that lacks them.
/// (Listed with what each holds.)
const ADDED_COLUMNS: [(&str, &str); 4] = [
    ("cost_day", "the day of cost_day_used"),
    ("cost_day_used", "micro-units of money spent in that day"),
    ("cost_month", "the month of cost_month_used"),
    (
        "cost_month_used",
        "micro-units of money spent in that month",
    ),
];

/// The added columns the table lacks (a file written by an older version
/// lacks them until opened for writing).
fn missing_columns(db: &Connection) -> rusqlite::Result<Vec<&'static str>> {
    let mut columns = db.prepare("SELECT name FROM pragma_table_info('budget_state')")?;
    let names: Vec<String> = columns
        .query_map([], |row| row.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(ADDED_COLUMNS
        .iter()
        .map(|(column, _)| *column)
        .filter(|column| !names.iter().any(|name| name == column))
        .collect())
}

fn has_added_columns(db: &Connection) -> rusqlite::Result<bool> {
    Ok(missing_columns(db)?.is_empty())
}

/// Adds the missing columns (0: nothing spent in no period).
fn migrate(db: &Connection) -> rusqlite::Result<()> {
    for column in missing_columns(db)? {
        db.execute_batch(&format!(
            "ALTER TABLE budget_state ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0"
        ))?;
    }
    Ok(())
}

/// How often changed accounts are written out.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// How long a store waits for another process to let go of its file (a
/// restart that overlaps the old process's drain) before it gives up.
const LOCK_WAIT: Duration = Duration::from_secs(60);

/// Locks `<store file>.lock` for this process, waiting up to `wait` for
/// another Iris using the same file to stop.
fn hold(path: &Path, wait: Duration) -> Result<std::fs::File, StoreError> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = PathBuf::from(name);
    let file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| StoreError(format!("sqlite store {}: {e}", lock_path.display())))?;
    let started = std::time::Instant::now();
    let mut said = false;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if started.elapsed() < wait => {
                if !said {
                    tracing::warn!(
                        "sqlite store {}: another Iris is using this file; waiting up to {} s \
                         for it to stop",
                        path.display(),
                        wait.as_secs()
                    );
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError(format!(
                    "sqlite store {}: another Iris is using this file (it holds {}); two \
                     servers cannot share one store file",
                    path.display(),
                    lock_path.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(StoreError(format!(
                    "sqlite store {}: {e}",
                    lock_path.display()
                )));
            }
        }
    }
}

/// `store_meta`'s row for the last write-ahead log generation the file
/// has absorbed.
const WAL_ABSORBED: &str = "wal_absorbed";

/// Rows another part of Iris writes with the store's settlements (the
/// spend log's records, or its spool's), so that they are durable with the
/// settlements they belong to: a response's end waits for one write, and a
/// crash keeps both or neither.
pub trait Rider: Send + Sync + 'static {
    /// Adds the rows no frame holds yet to `frame` (the write-ahead log's
    /// next), and counts them as in the log. `true` asks for the log to be
    /// folded into the file soon, before the next periodic flush (the
    /// rider holds many rows in memory).
    fn journal(&self, frame: &mut Frame) -> rusqlite::Result<bool>;
    /// Takes what waits to be written to the SQLite file, if anything:
    /// with `in_log_only`, only the rows a frame already holds (the load
    /// keeps its rider, to give back what a failed transaction did not
    /// write).
    fn take(self: Arc<Self>, in_log_only: bool) -> Option<Box<dyn Load>>;
}

/// What a [`Rider`] took for one transaction.
pub trait Load: Send {
    /// Writes the rows in the store's transaction (blocking).
    fn write(&self, transaction: &rusqlite::Transaction<'_>) -> rusqlite::Result<()>;
    /// The transaction committed.
    fn committed(self: Box<Self>);
    /// It did not: the rows wait for the next write.
    fn failed(self: Box<Self>);
}

pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    memory: MemoryStore,
    db: Mutex<Connection>,
    /// One flush at a time, so an older snapshot never overwrites a newer one.
    flushing: tokio::sync::Mutex<()>,
    /// The last write's error, reported by `health` until a write succeeds.
    last_error: Mutex<Option<String>>,
    path: PathBuf,
    /// Written in the same frames and transactions as the accounts.
    riders: Mutex<Vec<Arc<dyn Rider>>>,
    /// The write-ahead log. Locked before `riders` and a rider's own locks.
    wal: Mutex<wal::Writer>,
    /// The accounts settled since the last frame, by storage key.
    settled: Mutex<Vec<Box<str>>>,
    /// `<store file>.lock`, locked while this store is open: the log's
    /// files are this process's alone (another Iris on the same file would
    /// replay and remove them under it).
    held: Mutex<Option<std::fs::File>>,
    /// A flush was asked for ahead of the periodic one and has not begun.
    fold_asked: AtomicBool,
}

/// A log file this long is folded into the SQLite file at once, rather than
/// at the next periodic flush (which bounds a startup's replay and the
/// memory of the rows that wait).
const FOLD_AT_BYTES: u64 = 1 << 19;

fn db_error(path: &Path, e: &rusqlite::Error) -> StoreError {
    StoreError(format!("sqlite store {}: {e}", path.display()))
}

impl SqliteStore {
    /// Opens (or creates) the file and loads every account's state from it.
    pub fn open(path: &Path) -> Result<Arc<Self>, StoreError> {
        let held = hold(path, LOCK_WAIT)?;
        let db = Connection::open(path).map_err(|e| db_error(path, &e))?;
        // WAL: `iris usage` can read while the server writes; NORMAL sync is
        // durable across process crashes, which is what the store promises.
        // A small page cache: the folds append (the tables' and indexes'
        // last pages, and the few account rows), and the file's pages are
        // in the OS's cache anyway; SQLite's default 2 MiB, filled by the
        // spend log's growth, was resident for nothing.
        db.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000;
             PRAGMA cache_size = -512;",
        )
        .and_then(|()| db.execute_batch(SCHEMA))
        .and_then(|()| migrate(&db))
        .map_err(|e| db_error(path, &e))?;
        let mut db = db;
        let last = replay(&mut db, path)?;
        let states = read_states(&db).map_err(|e| db_error(path, &e))?;
        Ok(Arc::new(Self {
            inner: Arc::new(Inner {
                memory: MemoryStore::with_states(states),
                db: Mutex::new(db),
                flushing: tokio::sync::Mutex::new(()),
                last_error: Mutex::new(None),
                path: path.to_owned(),
                riders: Mutex::new(Vec::new()),
                wal: Mutex::new(wal::Writer::new(path, last + 1)),
                settled: Mutex::new(Vec::new()),
                fold_asked: AtomicBool::new(false),
                held: Mutex::new(Some(held)),
            }),
        }))
    }

    /// Every account's persisted state, read without starting a store (for
    /// `iris usage`). A missing file has no usage.
    pub fn read(path: &Path) -> Result<Vec<(Account, ClientState)>, StoreError> {
        if !path.exists() {
            return Ok(Vec::new());
        }
        let db = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| db_error(path, &e))?;
        db.busy_timeout(Duration::from_secs(5))
            .map_err(|e| db_error(path, &e))?;
        let exists: Option<i64> = db
            .query_row(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'budget_state'",
                [],
                |row| row.get(0),
            )
            .optional()
            .map_err(|e| db_error(path, &e))?;
        if exists.is_none() {
            return Ok(Vec::new());
        }
        // A running server's last settlements may be in its write-ahead
        // log only: read as the file will hold them.
        let states = with_log(&db, path, |db, items| {
            let mut states: std::collections::BTreeMap<String, ClientState> =
                read_states(db)?.into_iter().collect();
            for item in items {
                if let Item::State(key, state) = item {
                    states.insert(key, state);
                }
            }
            Ok(states)
        })?;
        // A row of a kind this version does not know is a newer instance's.
        Ok(states
            .into_iter()
            .filter_map(|(key, state)| Some((Account::from_key(&key)?, state)))
            .collect())
    }

    /// Writes `rider`'s rows in every transaction from now on.
    pub fn carry(&self, rider: Arc<dyn Rider>) {
        self.inner
            .riders
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(rider);
    }

    /// The file the store writes.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Writes changed accounts every `every` until the store is dropped.
    pub fn spawn_flusher(&self, every: Duration) {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let Some(inner) = weak.upgrade() else { break };
                if let Err(e) = Inner::flush(inner).await {
                    tracing::error!("budget usage not persisted: {e}");
                }
            }
        });
    }
}

impl Inner {
    /// Writes what the last frame did not hold to the write-ahead log:
    /// the accounts settled since, and the riders' new rows. `false` when
    /// the log is off (a write failed, now or before): the caller then
    /// needs a commit to the SQLite file. A log grown long, or a rider
    /// holding many rows, asks for a flush ahead of the periodic one.
    fn append(self: &Arc<Self>, log: &mut wal::Writer) -> bool {
        if !log.on() {
            return false;
        }
        let mut keys =
            std::mem::take(&mut *self.settled.lock().unwrap_or_else(PoisonError::into_inner));
        keys.sort_unstable();
        keys.dedup();
        let mut frame = Frame::default();
        for key in &keys {
            if let Some(state) = self.memory.state_of(key) {
                frame.state(key, &state);
            }
        }
        let riders = self.riders.lock().unwrap_or_else(PoisonError::into_inner);
        let rows = riders.iter().try_fold(false, |fold, rider| {
            Ok::<_, rusqlite::Error>(rider.journal(&mut frame)? || fold)
        });
        drop(riders);
        let written = rows.map_err(|e| e.to_string()).and_then(|fold| {
            if !frame.is_empty() {
                log.append(&mut frame).map_err(|e| e.to_string())?;
            }
            Ok(fold || log.bytes() >= FOLD_AT_BYTES)
        });
        match written {
            Ok(fold) => {
                if fold && !self.fold_asked.swap(true, Ordering::Relaxed) {
                    self.fold_soon();
                }
                true
            }
            Err(e) => {
                // Off for good: what the frame held is still dirty or
                // waiting, and every flush from now takes it all.
                log.turn_off();
                tracing::error!(
                    "budget store {}: write-ahead log off until a restart (responses now \
                     wait for a SQLite commit): {e}",
                    self.path.display()
                );
                false
            }
        }
    }

    /// A flush now, in the background (none without a runtime: the
    /// periodic one or the last write will do).
    fn fold_soon(self: &Arc<Self>) {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let inner = Arc::clone(self);
            runtime.spawn(async move {
                if let Err(e) = Self::flush(inner).await {
                    tracing::error!("budget usage not persisted: {e}");
                }
            });
        }
    }

    async fn flush(self: Arc<Self>) -> Result<(), StoreError> {
        let _one_at_a_time = self.flushing.lock().await;
        self.fold_asked.store(false, Ordering::Relaxed);
        let (rows, loads, absorbed) = {
            let mut log = self.wal.lock().unwrap_or_else(PoisonError::into_inner);
            // Everything so far into the log first, so that the rows taken
            // now are exactly those of the files sealed now.
            let logging = self.append(&mut log);
            let absorbed = log.seal();
            (
                self.memory.take_dirty(),
                self.take_loads(logging),
                log.has_sealed().then_some(absorbed),
            )
        };
        if rows.is_empty() && loads.is_empty() && absorbed.is_none() {
            return Ok(());
        }
        let names: Vec<String> = rows.iter().map(|(name, _)| name.clone()).collect();
        let this = Arc::clone(&self);
        let written = tokio::task::spawn_blocking(move || {
            let result = this.write(&rows, &loads, absorbed);
            (result, loads)
        })
        .await;
        let (written, loads) = match written {
            Ok((result, loads)) => (result, loads),
            // The write's thread panicked: its loads are gone with it (not
            // reachable: nothing in a write panics).
            Err(e) => (
                Err(StoreError(format!("sqlite writer failed: {e}"))),
                Vec::new(),
            ),
        };
        let mut last_error = self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match written {
            Ok(()) => {
                *last_error = None;
                if let Some(absorbed) = absorbed {
                    self.wal
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove_through(absorbed);
                }
                loads.into_iter().for_each(|load| load.committed());
                Ok(())
            }
            Err(e) => {
                self.memory.mark_dirty(names);
                loads.into_iter().for_each(|load| load.failed());
                *last_error = Some(e.0.clone());
                Err(e)
            }
        }
    }

    /// What every rider has waiting (with `in_log_only`, only what the
    /// write-ahead log holds).
    fn take_loads(&self, in_log_only: bool) -> Vec<Box<dyn Load>> {
        let riders = self.riders.lock().unwrap_or_else(PoisonError::into_inner);
        riders
            .iter()
            .filter_map(|rider| Arc::clone(rider).take(in_log_only))
            .collect()
    }

    /// Upserts `rows` and writes `loads` in one transaction (blocking),
    /// recording that the file now holds every log file through
    /// `absorbed`.
    fn write(
        &self,
        rows: &[(String, ClientState)],
        loads: &[Box<dyn Load>],
        absorbed: Option<u64>,
    ) -> Result<(), StoreError> {
        let mut db = self.db.lock().unwrap_or_else(PoisonError::into_inner);
        write_states(&mut db, rows, loads, absorbed).map_err(|e| db_error(&self.path, &e))
    }
}

impl Drop for Inner {
    /// A last write when the store goes away (after the shutdown flush this
    /// finds nothing to do); covers a store dropped without a flush. It
    /// takes everything, in the log or not, and then the log is absorbed.
    /// Only then is the file's lock let go.
    fn drop(&mut self) {
        self.last_write();
        drop(
            self.held
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
    }
}

impl Inner {
    fn last_write(&mut self) {
        let log = self.wal.get_mut().unwrap_or_else(PoisonError::into_inner);
        let absorbed = log.seal();
        let absorbed = log.has_sealed().then_some(absorbed);
        let rows = self.memory.take_dirty();
        let loads = self.take_loads(false);
        if rows.is_empty() && loads.is_empty() && absorbed.is_none() {
            return;
        }
        match self.write(&rows, &loads, absorbed) {
            Ok(()) => {
                if let Some(absorbed) = absorbed {
                    self.wal
                        .get_mut()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove_through(absorbed);
                }
                loads.into_iter().for_each(|load| load.committed());
            }
            Err(e) => {
                tracing::error!("budget usage not persisted at exit: {e}");
                loads.into_iter().for_each(|load| load.failed());
            }
        }
    }
}

/// The last log generation the file has absorbed (0: none).
fn absorbed(db: &Connection) -> rusqlite::Result<u64> {
    let table: Option<i64> = db
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'store_meta'",
            [],
            |row| row.get(0),
        )
        .optional()?;
    if table.is_none() {
        return Ok(0);
    }
    Ok(db
        .query_row(
            "SELECT value FROM store_meta WHERE key = ?1",
            [WAL_ABSORBED],
            |row| row.get::<_, i64>(0),
        )
        .optional()?
        .map_or(0, from_sql))
}

/// A log file's items (its torn last write left out, and said); `None`
/// when it is gone.
fn read_log_file(file: &Path) -> Result<Option<Vec<Item>>, StoreError> {
    let bytes = match std::fs::read(file) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(StoreError(format!(
                "write-ahead log {}: {e}",
                file.display()
            )));
        }
    };
    let (items, whole) = wal::read_frames(&bytes);
    if whole < bytes.len() {
        tracing::warn!(
            "write-ahead log {}: the last {} bytes are a write cut short (left out)",
            file.display(),
            bytes.len() - whole
        );
    }
    Ok(Some(items))
}

fn log_files(path: &Path) -> Result<Vec<(u64, PathBuf)>, StoreError> {
    wal::files(path).map_err(|e| {
        StoreError(format!(
            "sqlite store {}: write-ahead log: {e}",
            path.display()
        ))
    })
}

/// The items of the log `files` after `absorbed`, in order. `None` for a
/// reader racing the server's flush: a file after `absorbed` was removed
/// (absorbed since), or the files do not follow on from `absorbed` (ones
/// between were absorbed and removed since); it reads again.
fn wal_items(files: Vec<(u64, PathBuf)>, absorbed: u64) -> Result<Option<Vec<Item>>, StoreError> {
    let mut read = Vec::new();
    let mut expected = absorbed + 1;
    for (generation, file) in files {
        if generation <= absorbed {
            continue;
        }
        if generation != expected {
            return Ok(None);
        }
        expected += 1;
        let Some(items) = read_log_file(&file)? else {
            return Ok(None);
        };
        read.extend(items);
    }
    Ok(Some(read))
}

/// Every log file after `absorbed`, in order, whatever is missing between
/// (nothing else writes the log while the store opens: a gap is files
/// removed by hand, and what is left is replayed).
fn replay_items(
    path: &Path,
    files: &[(u64, PathBuf)],
    absorbed: u64,
) -> Result<Vec<Item>, StoreError> {
    let mut read = Vec::new();
    let mut expected = absorbed + 1;
    for (generation, file) in files.iter().filter(|(g, _)| *g > absorbed) {
        if *generation != expected {
            tracing::warn!(
                "sqlite store {}: write-ahead log files {expected} to {} are missing",
                path.display(),
                generation - 1
            );
        }
        expected = generation + 1;
        read.extend(read_log_file(file)?.unwrap_or_default());
    }
    Ok(read)
}

/// Runs `read` on `db` (a reader's connection to a server's file) with the
/// log's items the file has not absorbed, in one read transaction, so the
/// file and the log are seen at one moment: neither a change missed nor
/// one seen twice. Tried again while the server's flush moves under it.
///
/// The log's files are listed before the file's snapshot is taken: a file
/// the server removes between the two was absorbed before its removal, so
/// the snapshot holds it. Listed after, a flush that absorbed and removed
/// the last files, with no newer file yet, left a snapshot without their
/// items and a listing without them either: items made durable before
/// the read went unseen.
pub fn with_log<T>(
    db: &Connection,
    path: &Path,
    read: impl Fn(&Connection, Vec<Item>) -> rusqlite::Result<T>,
) -> Result<T, StoreError> {
    with_log_racing(db, path, read, &mut || {})
}

/// [`with_log`], running `between` between its listing of the log's files
/// and its snapshot of the file (where a test's flush races it).
fn with_log_racing<T>(
    db: &Connection,
    path: &Path,
    read: impl Fn(&Connection, Vec<Item>) -> rusqlite::Result<T>,
    between: &mut dyn FnMut(),
) -> Result<T, StoreError> {
    let error = |e: &rusqlite::Error| db_error(path, e);
    for _ in 0..20 {
        let files = log_files(path)?;
        between();
        let transaction = db.unchecked_transaction().map_err(|e| error(&e))?;
        // The first read fixes the transaction's snapshot of the file.
        let absorbed = absorbed(&transaction).map_err(|e| error(&e))?;
        if let Some(items) = wal_items(files, absorbed)? {
            return read(&transaction, items).map_err(|e| error(&e));
        }
    }
    Err(StoreError(format!(
        "sqlite store {}: the server's write-ahead log kept moving under the read; try again",
        path.display()
    )))
}

/// Folds the log files the SQLite file has not absorbed into it, in one
/// transaction, then removes every log file. Answers the last generation.
fn replay(db: &mut Connection, path: &Path) -> Result<u64, StoreError> {
    let error = |e: &rusqlite::Error| db_error(path, e);
    let absorbed = absorbed(db).map_err(|e| error(&e))?;
    let files = log_files(path)?;
    let last = files
        .iter()
        .map(|(g, _)| *g)
        .max()
        .unwrap_or(0)
        .max(absorbed);
    let items = replay_items(path, &files, absorbed)?;
    if !items.is_empty() {
        let transaction = db.transaction().map_err(|e| error(&e))?;
        let mut states = Vec::new();
        let mut rows = 0_usize;
        for item in items {
            match item {
                Item::State(key, state) => states.push((key, state)),
                Item::Row {
                    table,
                    columns,
                    values,
                } => {
                    let sql = wal::insert_sql(&table, &columns, values.len()).ok_or_else(|| {
                        StoreError(format!(
                            "sqlite store {}: write-ahead log: a row for {table:?} with \
                             columns {columns:?} cannot be replayed",
                            path.display()
                        ))
                    })?;
                    transaction
                        .prepare_cached(&sql)
                        .and_then(|mut insert| {
                            insert.execute(rusqlite::params_from_iter(values.iter()))
                        })
                        .map_err(|e| error(&e))?;
                    rows += 1;
                }
            }
        }
        let accounts = states.len();
        upsert_states(&transaction, &states).map_err(|e| error(&e))?;
        set_absorbed(&transaction, last).map_err(|e| error(&e))?;
        transaction.commit().map_err(|e| error(&e))?;
        tracing::info!(
            "budget store {}: write-ahead log replayed ({accounts} account states, {rows} rows)",
            path.display()
        );
    }
    for (_, file) in &files {
        wal::remove(file);
    }
    Ok(last)
}

fn set_absorbed(db: &Connection, generation: u64) -> rusqlite::Result<()> {
    db.execute(
        "INSERT INTO store_meta (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![WAL_ABSORBED, to_sql(generation)],
    )
    .map(drop)
}

fn to_sql(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn from_sql(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// Every row, by storage key.
fn read_states(db: &Connection) -> rusqlite::Result<Vec<(String, ClientState)>> {
    let costs = if has_added_columns(db)? {
        "cost_day, cost_day_used, cost_month, cost_month_used"
    } else {
        "0, 0, 0, 0"
    };
    let mut statement = db.prepare(&format!(
        "SELECT client, requests_tat, tokens_tat, day, day_used, month, month_used, {costs} \
         FROM budget_state"
    ))?;
    let rows = statement.query_map([], |row| {
        let period = |i| row.get::<_, i64>(i).map(|p| u32::try_from(p).unwrap_or(0));
        Ok((
            row.get::<_, String>(0)?,
            ClientState {
                requests: Bucket {
                    tat: from_sql(row.get(1)?),
                },
                tokens: Bucket {
                    tat: from_sql(row.get(2)?),
                },
                day: Calendar {
                    period: period(3)?,
                    used: from_sql(row.get(4)?),
                },
                month: Calendar {
                    period: period(5)?,
                    used: from_sql(row.get(6)?),
                },
                cost_day: Calendar {
                    period: period(7)?,
                    used: from_sql(row.get(8)?),
                },
                cost_month: Calendar {
                    period: period(9)?,
                    used: from_sql(row.get(10)?),
                },
                in_flight: 0,
            },
        ))
    })?;
    rows.collect()
}

fn write_states(
    db: &mut Connection,
    rows: &[(String, ClientState)],
    loads: &[Box<dyn Load>],
    absorbed: Option<u64>,
) -> rusqlite::Result<()> {
    let transaction = db.transaction()?;
    upsert_states(&transaction, rows)?;
    for load in loads {
        load.write(&transaction)?;
    }
    if let Some(absorbed) = absorbed {
        set_absorbed(&transaction, absorbed)?;
    }
    transaction.commit()
}

fn upsert_states(db: &Connection, rows: &[(String, ClientState)]) -> rusqlite::Result<()> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut upsert = db.prepare_cached(
        "INSERT INTO budget_state (client, requests_tat, tokens_tat, day, day_used, month,
            month_used, cost_day, cost_day_used, cost_month, cost_month_used, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
         ON CONFLICT (client) DO UPDATE SET
            requests_tat = excluded.requests_tat, tokens_tat = excluded.tokens_tat,
            day = excluded.day, day_used = excluded.day_used,
            month = excluded.month, month_used = excluded.month_used,
            cost_day = excluded.cost_day, cost_day_used = excluded.cost_day_used,
            cost_month = excluded.cost_month, cost_month_used = excluded.cost_month_used,
            updated_at = excluded.updated_at",
    )?;
    for (key, state) in rows {
        upsert.execute(params![
            key,
            to_sql(state.requests.tat),
            to_sql(state.tokens.tat),
            i64::from(state.day.period),
            to_sql(state.day.used),
            i64::from(state.month.period),
            to_sql(state.month.used),
            i64::from(state.cost_day.period),
            to_sql(state.cost_day.used),
            i64::from(state.cost_month.period),
            to_sql(state.cost_month.used),
            to_sql(now),
        ])?;
    }
    Ok(())
}

impl Store for SqliteStore {
    fn reserve(&self, parties: &Parties, charge: Charge, now: u64) -> StoreFuture<Reserved> {
        ready(Ok(self.inner.memory.reserve_now(parties, charge, now)))
    }

    fn settle(&self, parties: &Parties, hold: Hold, actual: Charge, now: u64) -> StoreFuture<()> {
        self.inner.memory.settle_now(parties, &hold, actual, now);
        self.inner
            .settled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(parties.iter().map(|party| Box::from(party.account.key())));
        ready(Ok(()))
    }

    fn snapshot(&self, account: &Account, limits: &Limits, now: u64) -> StoreFuture<Snapshot> {
        ready(Ok(self.inner.memory.snapshot_now(account, limits, now)))
    }

    fn health(&self) -> StoreFuture<()> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            let failed = inner
                .last_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            if let Some(error) = failed {
                return Err(StoreError(format!("last write failed: {error}")));
            }
            tokio::task::spawn_blocking(move || {
                let db = inner.db.lock().unwrap_or_else(PoisonError::into_inner);
                db.query_row("SELECT count(*) FROM budget_state", [], |row| {
                    row.get::<_, i64>(0)
                })
                .map(drop)
                .map_err(|e| db_error(&inner.path, &e))
            })
            .await
            .unwrap_or_else(|e| Err(StoreError(format!("sqlite health check failed: {e}"))))
        })
    }

    fn flush(&self) -> StoreFuture<()> {
        Box::pin(Inner::flush(Arc::clone(&self.inner)))
    }

    /// Every settlement and rider row so far in the write-ahead log: one
    /// `write(2)` on the caller's thread, which a caller that finds its
    /// rows already written by another skips (a group write).
    ///
    /// With the log off (a write failed), a flush instead, which is a group
    /// commit: flushes run one at a time, and the one that gets its turn
    /// takes everything changed until then, so those waiting behind it find
    /// nothing left and are done at once. The flush runs as a task of its
    /// own: a waiter that goes away (its client hung up) must not stop a
    /// write half-way and let a newer one overtake it with an older state.
    /// Nothing is spawned unless polled.
    fn persisted(&self) -> StoreFuture<()> {
        let logged = {
            let mut log = self
                .inner
                .wal
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            self.inner.append(&mut log)
        };
        if logged {
            return ready(Ok(()));
        }
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            tokio::spawn(Inner::flush(inner))
                .await
                .unwrap_or_else(|e| Err(StoreError(format!("sqlite writer failed: {e}"))))
        })
    }
}

/// Budget alerts claimed in the file, so that a restart does not send one
/// again: a row per claim, `INSERT OR IGNORE`d, the expired ones deleted
/// on the way.
impl AlertClaims for SqliteStore {
    fn claim(&self, key: &str, ttl: Duration) -> ClaimFuture {
        let inner = Arc::clone(&self.inner);
        let key = key.to_owned();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or(Duration::ZERO)
                    .as_secs();
                let db = inner.db.lock().unwrap_or_else(PoisonError::into_inner);
                db.execute(
                    "DELETE FROM alert_claims WHERE expires_at < ?1",
                    params![to_sql(now)],
                )
                .and_then(|_| {
                    db.execute(
                        "INSERT OR IGNORE INTO alert_claims (key, expires_at) VALUES (?1, ?2)",
                        params![key, to_sql(now.saturating_add(ttl.as_secs()))],
                    )
                })
                .map(|inserted| inserted == 1)
                .map_err(|e| ClaimError(db_error(&inner.path, &e).0))
            })
            .await
            .unwrap_or_else(|e| Err(ClaimError(format!("sqlite claim failed: {e}"))))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::store::OneAccount;
    use crate::budget::window::{NANOS_PER_SEC, Window};

    const NOW: u64 = 1_717_200_000 * NANOS_PER_SEC;

    fn limits() -> Limits {
        Limits {
            tokens_per_minute: Some(10_000),
            tokens_per_day: Some(100_000),
            ..Limits::default()
        }
    }

    async fn spend(store: &SqliteStore, client: &str, reserve: u64, actual: u64) {
        let client = Account::client(client);
        let hold = store
            .reserve_one(&client, &limits(), reserve, NOW)
            .await
            .expect("store")
            .outcome
            .expect("fits");
        store
            .settle_one(&client, &limits(), hold, actual, NOW)
            .await
            .expect("store");
    }

    #[tokio::test]
    async fn settled_usage_survives_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("usage.db");
        let store = SqliteStore::open(&path).expect("open");
        spend(&store, "team-a", 500, 321).await;
        spend(&store, "team-b", 10, 10).await;
        store.flush().await.expect("flush");
        let before = store
            .snapshot(&Account::client("team-a"), &limits(), NOW)
            .await
            .expect("snapshot");
        drop(store);

        let reopened = SqliteStore::open(&path).expect("reopen");
        let after = reopened
            .snapshot(&Account::client("team-a"), &limits(), NOW)
            .await
            .expect("snapshot");
        assert_eq!(after, before);
        assert_eq!(after.get(Window::TokensPerDay).used, 321);
        assert_eq!(after.get(Window::TokensPerMinute).used, 321);

        let mut read = SqliteStore::read(&path).expect("read");
        read.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(read.len(), 2);
        assert_eq!(read[1].1.day.used, 10);
    }

    #[tokio::test]
    async fn dropping_the_store_writes_what_is_left() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("usage.db");
        let store = SqliteStore::open(&path).expect("open");
        spend(&store, "c", 50, 40).await;
        drop(store);
        let read = SqliteStore::read(&path).expect("read");
        assert_eq!(read[0].1.day.used, 40);
    }

    /// The budget rows in the SQLite file itself (not the log's overlay).
    fn rows_in_file(path: &Path) -> Vec<(String, u64)> {
        Connection::open(path)
            .expect("open")
            .prepare("SELECT client, day_used FROM budget_state ORDER BY client")
            .expect("sql")
            .query_map([], |row| Ok((row.get(0)?, from_sql(row.get(1)?))))
            .expect("query")
            .collect::<rusqlite::Result<_>>()
            .expect("rows")
    }

    fn log_files(path: &Path) -> Vec<u64> {
        wal::files(path)
            .expect("files")
            .into_iter()
            .map(|(generation, _)| generation)
            .collect()
    }

    #[tokio::test]
    async fn a_settlement_is_in_the_log_once_persisted_answers_and_in_the_file_after_a_flush() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("usage.db");
        let store = SqliteStore::open(&path).expect("open");
        spend(&store, "c", 50, 42).await;
        spend(&store, "d", 50, 7).await;
        assert!(SqliteStore::read(&path).expect("read").is_empty());
        assert!(
            log_files(&path).is_empty(),
            "nothing written before persisted"
        );
        store.persisted().await.expect("persisted");
        assert_eq!(log_files(&path), [1], "in one frame of the log");
        assert!(rows_in_file(&path).is_empty(), "no commit per response");
        // `iris usage` reads what the log holds too.
        let mut read = SqliteStore::read(&path).expect("read");
        read.sort_by(|a, b| a.0.cmp(&b.0));
        let used: Vec<u64> = read.iter().map(|(_, s)| s.day.used).collect();
        assert_eq!(used, [42, 7]);
        // Nothing changed since: nothing to write.
        store.persisted().await.expect("persisted");

        store.flush().await.expect("flush");
        assert_eq!(
            rows_in_file(&path),
            [("c".to_owned(), 42), ("d".to_owned(), 7)]
        );
        assert!(log_files(&path).is_empty(), "absorbed, then removed");
        drop(store);
    }

    /// Rows of one kind, written with the settlements: a note per row.
    #[derive(Default)]
    struct Notes {
        waiting: Mutex<Vec<String>>,
        /// How many of `waiting` a frame holds.
        in_log: Mutex<usize>,
        committed: Mutex<Vec<String>>,
    }

    impl Notes {
        fn add(&self, note: &str) {
            self.waiting.lock().expect("lock").push(note.into());
        }
    }

    struct NoteLoad(Vec<String>, Arc<Notes>);

    impl Rider for Notes {
        fn journal(&self, frame: &mut Frame) -> rusqlite::Result<bool> {
            let waiting = self.waiting.lock().expect("lock");
            let mut in_log = self.in_log.lock().expect("lock");
            for note in &waiting[*in_log..] {
                frame.row("notes", "note", &[note])?;
            }
            *in_log = waiting.len();
            // Many notes waiting: folded in at once.
            Ok(waiting.len() >= 3)
        }

        fn take(self: Arc<Self>, in_log_only: bool) -> Option<Box<dyn Load>> {
            let mut waiting = self.waiting.lock().expect("lock");
            let mut in_log = self.in_log.lock().expect("lock");
            let count = if in_log_only { *in_log } else { waiting.len() };
            *in_log -= count.min(*in_log);
            let notes: Vec<String> = waiting.drain(..count).collect();
            drop((waiting, in_log));
            (!notes.is_empty()).then(|| Box::new(NoteLoad(notes, self)) as Box<dyn Load>)
        }
    }

    impl Load for NoteLoad {
        fn write(&self, transaction: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
            for note in &self.0 {
                transaction.execute("INSERT INTO notes (note) VALUES (?1)", [note])?;
            }
            Ok(())
        }

        fn committed(self: Box<Self>) {
            self.1.committed.lock().expect("lock").extend(self.0);
        }

        fn failed(self: Box<Self>) {
            let NoteLoad(mut notes, rider) = *self;
            let mut waiting = rider.waiting.lock().expect("lock");
            *rider.in_log.lock().expect("lock") += notes.len();
            notes.append(&mut waiting);
            *waiting = notes;
        }
    }

    /// A store in a new directory's `iris.db`, carrying notes whose table
    /// is there.
    fn with_notes() -> (tempfile::TempDir, Arc<SqliteStore>, Arc<Notes>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("iris.db");
        let store = SqliteStore::open(&path).expect("open");
        Connection::open(&path)
            .expect("open")
            .execute_batch("CREATE TABLE notes (note TEXT NOT NULL)")
            .expect("create");
        let notes = Arc::new(Notes::default());
        store.carry(notes.clone());
        (dir, store, notes)
    }

    fn notes_in_file(path: &Path) -> Vec<String> {
        Connection::open(path)
            .expect("open")
            .prepare("SELECT note FROM notes ORDER BY rowid")
            .expect("sql")
            .query_map([], |row| row.get(0))
            .expect("query")
            .collect::<rusqlite::Result<_>>()
            .expect("rows")
    }

    /// A rider's rows go in the store's log frames and transactions, with
    /// the settlements: both or neither. A transaction that fails (here,
    /// the rider's table is missing) keeps the rows, the settlement and
    /// the log files for the next flush, which commits both.
    #[tokio::test]
    async fn riders_are_written_with_the_settlements() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("iris.db");
        let store = SqliteStore::open(&path).expect("open");
        let notes = Arc::new(Notes::default());
        store.carry(notes.clone());
        spend(&store, "c", 50, 42).await;
        notes.add("first");
        store.persisted().await.expect("in the log");
        let failed = store.flush().await.expect_err("no notes table");
        assert!(failed.0.contains("notes"), "{failed}");
        assert!(rows_in_file(&path).is_empty(), "neither");
        assert_eq!(*notes.waiting.lock().expect("lock"), ["first"]);
        assert_eq!(log_files(&path), [1], "kept for the next flush");

        Connection::open(&path)
            .expect("open")
            .execute_batch("CREATE TABLE notes (note TEXT NOT NULL)")
            .expect("create");
        notes.add("second");
        store.persisted().await.expect("in the log");
        notes.add("third, not yet in the log");
        store.flush().await.expect("flush");
        assert_eq!(rows_in_file(&path), [("c".to_owned(), 42)]);
        assert_eq!(
            notes_in_file(&path),
            ["first", "second", "third, not yet in the log"],
            "in the order they came; a flush logs what waits first"
        );
        assert_eq!(notes.committed.lock().expect("lock").len(), 3);
        assert!(log_files(&path).is_empty());
    }

    /// `kill -9` after `persisted`: the next open replays the log into the
    /// file (states and rows, once), and a log file the file had already
    /// absorbed is not replayed again.
    #[tokio::test]
    async fn a_crash_after_persisted_loses_nothing_and_replays_once() {
        let (dir, store, notes) = with_notes();
        let path = dir.path().join("iris.db");
        spend(&store, "c", 50, 40).await;
        notes.add("kept");
        store.persisted().await.expect("persisted");
        spend(&store, "c", 50, 2).await;
        store.persisted().await.expect("persisted");
        spend(&store, "c", 50, 1000).await; // not persisted: may be lost
        // A crash: no flush, no last write (and, as at a process's end, the
        // file's lock let go).
        drop(store.inner.held.lock().expect("lock").take());
        std::mem::forget(store);

        let reopened = SqliteStore::open(&path).expect("reopen");
        assert_eq!(rows_in_file(&path), [("c".to_owned(), 42)]);
        assert_eq!(notes_in_file(&path), ["kept"]);
        assert!(log_files(&path).is_empty());
        let used = reopened
            .snapshot(&Account::client("c"), &limits(), NOW)
            .await
            .expect("snapshot")
            .get(Window::TokensPerDay)
            .used;
        assert_eq!(used, 42, "the reopened store starts from the replay");
        drop(reopened);

        // A log file left behind by a crash between a flush's commit and
        // its removal (its generation absorbed): removed, not replayed.
        let absorbed = {
            let db = Connection::open(&path).expect("open");
            absorbed(&db).expect("absorbed")
        };
        let mut stale = wal::Writer::new(&path, absorbed);
        let mut frame = Frame::default();
        let mut old = ClientState::default();
        old.day.used = 1;
        frame.state("c", &old);
        frame.row("notes", "note", &[&"kept"]).expect("row");
        stale.append(&mut frame).expect("append");
        drop(stale);
        assert_eq!(log_files(&path), [absorbed]);
        drop(SqliteStore::open(&path).expect("reopen"));
        assert_eq!(rows_in_file(&path), [("c".to_owned(), 42)]);
        assert_eq!(notes_in_file(&path), ["kept"], "not twice");
        assert!(log_files(&path).is_empty());
    }

    /// A rider holding many rows has the log folded into the file at once,
    /// not a second later.
    #[tokio::test]
    async fn a_rider_holding_many_rows_has_the_log_folded_in_at_once() {
        let (dir, store, notes) = with_notes();
        let path = dir.path().join("iris.db");
        for note in ["1", "2"] {
            notes.add(note);
            store.persisted().await.expect("persisted");
        }
        tokio::task::yield_now().await;
        assert!(notes_in_file(&path).is_empty(), "two wait for the flush");
        notes.add("3");
        store.persisted().await.expect("persisted");
        for _ in 0..500 {
            if notes_in_file(&path).len() == 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(notes_in_file(&path), ["1", "2", "3"]);
    }

    /// A second store on the same file (another Iris) waits for the first
    /// to let go, then gives up with a message that says why.
    #[test]
    fn a_second_store_on_one_file_waits_for_the_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("iris.db");
        let first = hold(&path, Duration::ZERO).expect("first");
        let refused = hold(&path, Duration::from_millis(300)).expect_err("held");
        assert!(
            refused.0.contains("another Iris is using this file"),
            "{refused}"
        );
        let releasing = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(first);
        });
        hold(&path, Duration::from_secs(10)).expect("let go");
        releasing.join().expect("thread");
    }

    /// A reader racing the flush sees the files move: one absorbed and
    /// removed between its read of the file and its listing leaves a gap
    /// after what the file says it absorbed, and it reads again.
    #[test]
    fn a_reader_finding_the_log_moved_reads_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("iris.db");
        let mut frame = Frame::default();
        frame.state("c", &ClientState::default());
        for generation in [5, 6] {
            let mut writer = wal::Writer::new(&path, generation);
            writer.append(&mut frame).expect("append");
        }
        let files = || super::log_files(&path).expect("files");
        assert_eq!(
            wal_items(files(), 4)
                .expect("read")
                .map(|items| items.len()),
            Some(2),
            "5 and 6 follow on from 4"
        );
        assert_eq!(
            wal_items(files(), 6).expect("read").map(|i| i.len()),
            Some(0)
        );
        assert!(wal_items(files(), 3).expect("read").is_none(), "4 is gone");
        assert_eq!(
            replay_items(&path, &super::log_files(&path).expect("files"), 3)
                .expect("replay")
                .len(),
            2,
            "a start replays what is there"
        );
        // A file listed, then removed (absorbed) before it is read.
        let listed = files();
        std::fs::remove_file(&listed[0].1).expect("remove");
        assert!(wal_items(listed, 4).expect("read").is_none(), "5 went");
    }

    /// A flush that absorbs and removes the log's last file between a
    /// reader's listing of the files and its snapshot of the file hides
    /// nothing: the snapshot holds what the listing named. (Taken the other
    /// way round, the snapshot missed the file's items and the listing,
    /// with no newer file made yet, missed the file.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flush_between_a_readers_listing_and_its_snapshot_hides_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("usage.db");
        let store = SqliteStore::open(&path).expect("open");
        spend(&store, "c", 50, 42).await;
        store.persisted().await.expect("persisted");
        assert_eq!(log_files(&path), [1], "in the log only");
        assert!(rows_in_file(&path).is_empty());
        let runtime = tokio::runtime::Handle::current();
        let reader_path = path.clone();
        let seen = tokio::task::spawn_blocking(move || {
            let db = Connection::open_with_flags(
                &reader_path,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .expect("open");
            let mut flushed = false;
            with_log_racing(
                &db,
                &reader_path,
                |db, items| {
                    let mut keys: Vec<String> =
                        read_states(db)?.into_iter().map(|(key, _)| key).collect();
                    keys.extend(items.into_iter().filter_map(|item| match item {
                        Item::State(key, _) => Some(key),
                        Item::Row { .. } => None,
                    }));
                    Ok(keys)
                },
                &mut || {
                    if !std::mem::replace(&mut flushed, true) {
                        runtime.block_on(store.flush()).expect("flush");
                        assert!(log_files(&reader_path).is_empty(), "absorbed and removed");
                    }
                },
            )
            .expect("read")
        })
        .await
        .expect("reader");
        assert_eq!(seen.len(), 1, "the settlement is seen once: {seen:?}");
    }

    /// A log that cannot be written (here its file's name is taken by a
    /// directory) is turned off: `persisted` then commits to the SQLite
    /// file, rows and all, as before the log existed.
    #[tokio::test]
    async fn a_log_that_cannot_be_written_gives_way_to_a_commit() {
        let (dir, store, notes) = with_notes();
        let path = dir.path().join("iris.db");
        std::fs::create_dir(dir.path().join("iris.db.wal.1")).expect("mkdir");
        spend(&store, "c", 50, 42).await;
        notes.add("committed");
        store.persisted().await.expect("persisted by a commit");
        assert_eq!(rows_in_file(&path), [("c".to_owned(), 42)]);
        assert_eq!(notes_in_file(&path), ["committed"]);
        spend(&store, "c", 50, 1).await;
        store.persisted().await.expect("persisted by a commit");
        assert_eq!(rows_in_file(&path), [("c".to_owned(), 43)]);
        drop(store);
    }

    #[tokio::test]
    async fn the_flusher_persists_within_its_period() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("usage.db");
        let store = SqliteStore::open(&path).expect("open");
        store.spawn_flusher(Duration::from_millis(20));
        spend(&store, "c", 50, 42).await;
        let mut persisted = Vec::new();
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            persisted = SqliteStore::read(&path).expect("read");
            if !persisted.is_empty() {
                break;
            }
        }
        // The store is still open, so the background flusher wrote this.
        assert_eq!(persisted.first().map(|(_, s)| s.day.used), Some(42));
        drop(store);
    }

    #[tokio::test]
    async fn a_missing_file_reads_as_no_usage_and_a_bad_one_fails_to_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(
            SqliteStore::read(&dir.path().join("none.db"))
                .expect("read")
                .is_empty()
        );
        let bad = dir.path().join("bad.db");
        std::fs::write(
            &bad,
            b"this is not a database, but it is long enough to look like one....",
        )
        .expect("write");
        assert!(SqliteStore::open(&bad).is_err());
        assert!(SqliteStore::open(&dir.path().join("no/such/dir/x.db")).is_err());
    }

    #[tokio::test]
    async fn health_reports_a_failed_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("usage.db")).expect("open");
        store.health().await.expect("healthy");
        *store.inner.last_error.lock().expect("lock") = Some("disk full".into());
        let error = store.health().await.expect_err("unhealthy");
        assert!(error.0.contains("disk full"), "{error}");
    }

    #[tokio::test]
    async fn an_alert_is_claimed_once_and_still_after_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("iris.db");
        let hour = Duration::from_secs(3600);
        let store = SqliteStore::open(&path).expect("open");
        assert_eq!(store.claim("k", hour).await, Ok(true));
        assert_eq!(store.claim("k", hour).await, Ok(false));
        assert_eq!(store.claim("other", hour).await, Ok(true));
        drop(store);
        let store = SqliteStore::open(&path).expect("reopen");
        assert_eq!(
            store.claim("k", hour).await,
            Ok(false),
            "a restart does not send an alert again"
        );
    }
}
