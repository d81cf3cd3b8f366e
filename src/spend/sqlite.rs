//! The SQLite sink (the default): the `spend_log` table in the budget
//! store's file (WAL mode, so `iris usage` reads while the server writes),
//! in its own file, or in memory. Every operation runs on the blocking pool;
//! a batch is one transaction. Also the SQL both local tables share: the
//! log's and the spool's ([`Table`]), which hold a record alike.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, ToSql, params};

use super::migrations::{self, COMPONENT};
use super::report::{Counts, Dimension, Query, Totals};
use super::{Record, Sink, SinkError, SinkFuture};
use crate::budget::money::Money;
use crate::facts::{CacheOutcome, RequestFacts};
use crate::openai::Api;

pub struct SqliteSink {
    db: Arc<Mutex<Connection>>,
    /// For messages; `None` in memory.
    path: Option<PathBuf>,
}

impl SqliteSink {
    /// Opens (or creates) `path`, or an in-memory database, and migrates it.
    pub fn open(path: Option<&Path>) -> Result<Self, SinkError> {
        let name = path.map(Path::to_path_buf);
        let error = |e: rusqlite::Error| SinkError(message(name.as_deref(), &e));
        let mut db = match path {
            Some(path) => Connection::open(path),
            None => Connection::open_in_memory(),
        }
        .map_err(error)?;
        db.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000;",
        )
        .map_err(error)?;
        migrate(&mut db, COMPONENT, migrations::SQLITE)
            .map_err(|e| SinkError(format!("{}: {e}", describe(name.as_deref()))))?;
        Ok(Self {
            db: Arc::new(Mutex::new(db)),
            path: name,
        })
    }

    /// Opens `path` for reading only (`iris usage`), without creating or
    /// migrating anything: `None` when there is no spend log there yet.
    pub fn open_read_only(path: &Path) -> Result<Option<Self>, SinkError> {
        if !path.exists() {
            return Ok(None);
        }
        let error = |e: rusqlite::Error| SinkError(message(Some(path), &e));
        let db =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(error)?;
        db.busy_timeout(Duration::from_secs(5)).map_err(error)?;
        let exists: Option<i64> = db
            .query_row(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'spend_log'",
                [],
                |row| row.get(0),
            )
            .optional()
            .map_err(error)?;
        if exists.is_none() {
            return Ok(None);
        }
        // Read-only: nothing is migrated here, so an older schema lacks
        // columns the report sums; say what to do rather than fail on SQL.
        let version: i64 = db
            .query_row(
                "SELECT version FROM schema_version WHERE component = ?1",
                [COMPONENT],
                |row| row.get(0),
            )
            .optional()
            .map_err(error)?
            .unwrap_or(0);
        let latest = migrations::latest(migrations::SQLITE);
        if version < latest {
            return Err(SinkError(format!(
                "{}: the spend log's tables are at schema version {version}, older than this \
                 Iris's ({latest}): start this Iris's server once (it migrates them), then ask again",
                describe(Some(path))
            )));
        }
        Ok(Some(Self {
            db: Arc::new(Mutex::new(db)),
            path: Some(path.to_owned()),
        }))
    }

    /// The totals of `query`, on this thread (blocking), a read-only
    /// reader's: with the records a running server's write-ahead log holds
    /// that the file does not yet.
    pub fn totals_now(&self, query: &Query) -> Result<Vec<Totals>, SinkError> {
        let db = self.db.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(path) = &self.path else {
            return totals(&db, query).map_err(|e| SinkError(message(None, &e)));
        };
        crate::budget::store::with_log(&db, path, |db, items| {
            see_logged_rows(db, items)?;
            totals(db, query)
        })
        .map_err(|e| SinkError(e.0))
    }

    /// Runs `work` on the connection, on the blocking pool.
    fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> SinkFuture<'_, T> {
        let db = Arc::clone(&self.db);
        let path = self.path.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let mut db = db.lock().unwrap_or_else(PoisonError::into_inner);
                work(&mut db).map_err(|e| SinkError(message(path.as_deref(), &e)))
            })
            .await
            .unwrap_or_else(|e| Err(SinkError(format!("spend log writer failed: {e}"))))
        })
    }
}

/// A running server's last records may be in the SQLite store's
/// write-ahead log only (folded into the file within a second): a reader
/// sees them through a temporary view that shadows `spend_log` on its own
/// connection (temporary objects are searched first), made in the read's
/// transaction and gone with it; the file itself is never written.
fn see_logged_rows(
    db: &Connection,
    items: Vec<crate::budget::store::LogItem>,
) -> rusqlite::Result<()> {
    let mut made = false;
    for item in items {
        let crate::budget::store::LogItem::Row {
            table,
            columns,
            values,
        } = item
        else {
            continue;
        };
        if table != Table::Log.name() {
            continue;
        }
        if !made {
            db.execute_batch(
                "CREATE TEMP TABLE logged AS SELECT * FROM main.spend_log WHERE 0;
                 CREATE TEMP VIEW spend_log AS
                     SELECT * FROM main.spend_log UNION ALL SELECT * FROM temp.logged;",
            )?;
            made = true;
        }
        let sql = crate::budget::store::insert_sql("logged", &columns, values.len())
            .ok_or_else(|| rusqlite::Error::InvalidColumnName(columns.clone()))?;
        db.prepare_cached(&sql)?
            .execute(rusqlite::params_from_iter(values.iter()))?;
    }
    Ok(())
}

pub(super) fn describe(path: Option<&Path>) -> String {
    match path {
        Some(path) => format!("sqlite {}", path.display()),
        None => "sqlite (in memory)".into(),
    }
}

pub(super) fn message(path: Option<&Path>, e: &rusqlite::Error) -> String {
    format!("{}: {e}", describe(path))
}

/// Applies `component`'s pending migrations in one transaction that holds
/// the write lock from its start, so two processes never apply one twice.
pub(super) fn migrate(
    db: &mut Connection,
    component: &str,
    list: &'static [migrations::Migration],
) -> Result<(), String> {
    let tx = db
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(|e| e.to_string())?;
    tx.execute_batch(migrations::SQLITE_VERSION_TABLE)
        .map_err(|e| e.to_string())?;
    let current: i64 = tx
        .query_row(
            "SELECT version FROM schema_version WHERE component = ?1",
            [component],
            |row| row.get(0),
        )
        .optional()
        .map_err(|e| e.to_string())?
        .unwrap_or(0);
    let pending = migrations::pending(list, current)?;
    let Some(last) = pending.last() else {
        return Ok(());
    };
    for migration in pending {
        tx.execute_batch(migration.sql)
            .map_err(|e| format!("migration {}: {e}", migration.version))?;
    }
    tx.execute(
        "INSERT INTO schema_version (component, version) VALUES (?1, ?2)
         ON CONFLICT (component) DO UPDATE SET version = excluded.version",
        params![component, last.version],
    )
    .map_err(|e| e.to_string())?;
    tx.commit().map_err(|e| e.to_string())
}

fn to_sql(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn from_sql(value: Option<i64>) -> u64 {
    value.and_then(|v| u64::try_from(v).ok()).unwrap_or(0)
}

/// A record's columns, in the order of [`with_values`] and [`read_record`]:
/// the same for both tables.
macro_rules! record_columns {
    () => {
        "record_id, at, request_id, client, model, upstream, upstream_model, status, \
         error_code, prompt_tokens, completion_tokens, total_tokens, images, image_bytes, \
         stream, attempts, ttfb_ms, total_ms, client_addr, team, cached_tokens, \
         reasoning_tokens, cost_micros, endpoint, cache_hit"
    };
}

/// After `INSERT INTO table`: the columns and their values' places.
macro_rules! insert_columns {
    () => {
        concat!(
            " (",
            record_columns!(),
            ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, \
             ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25)"
        )
    };
}

/// The local tables that hold records, column for column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// `spend_log`: the log itself.
    Log,
    /// `spend_spool`: records waiting for PostgreSQL.
    Spool,
}

impl Table {
    /// The columns of [`Self::insert_sql`], in its order.
    pub const COLUMNS: &'static str = record_columns!();

    pub fn name(self) -> &'static str {
        match self {
            Self::Log => "spend_log",
            Self::Spool => "spend_spool",
        }
    }

    /// The log's statement skips a record whose `record_id` it has: a
    /// batch the writer sends again (its first attempt timed out, yet ran)
    /// is then written, not refused as a whole and counted as dropped.
    fn insert_sql(self) -> &'static str {
        match self {
            Self::Log => concat!(
                "INSERT INTO spend_log",
                insert_columns!(),
                " ON CONFLICT (record_id) DO NOTHING"
            ),
            Self::Spool => concat!("INSERT INTO spend_spool", insert_columns!()),
        }
    }
}

/// Inserts `batch` into `table`, in the caller's transaction.
///
/// A statement keeps its values from one row to the next (until it goes
/// back to the cache, which clears them), so a column whose value is the
/// previous record's (the same client, model, upstream, endpoint, status,
/// no images...) is not bound again: binding copies a text into SQLite,
/// and a record's 25 bindings were a quarter of what inserting it cost.
pub(super) fn insert_into(db: &Connection, table: Table, batch: &[Record]) -> rusqlite::Result<()> {
    let mut statement = db.prepare_cached(table.insert_sql())?;
    let mut bind = |values: &[&dyn ToSql], previous: Option<&[&dyn ToSql]>| {
        for (i, value) in values.iter().enumerate() {
            if previous.is_none_or(|previous| !same_value(previous[i], *value)) {
                statement.raw_bind_parameter(i + 1, value)?;
            }
        }
        statement.raw_execute()
    };
    let mut previous: Option<&Record> = None;
    for record in batch {
        match previous {
            None => with_values(record, |values| bind(values, None))?,
            Some(previous) => with_values(record, |values| {
                with_values(previous, |old| bind(values, Some(old)))
            })?,
        };
        previous = Some(record);
    }
    Ok(())
}

impl ToSql for super::AddressText {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(rusqlite::types::ToSqlOutput::Borrowed(
            rusqlite::types::ValueRef::Text(self.as_str().as_bytes()),
        ))
    }
}

/// Whether two values bind alike (a value that cannot be bound never is).
fn same_value(a: &dyn ToSql, b: &dyn ToSql) -> bool {
    matches!((a.to_sql(), b.to_sql()), (Ok(a), Ok(b)) if a == b)
}

/// Calls `f` with `r`'s values, in the order of [`Table::COLUMNS`].
pub(super) fn with_values<R>(r: &Record, f: impl FnOnce(&[&dyn ToSql]) -> R) -> R {
    let facts = &*r.facts;
    f(params![
        r.record_id,
        r.at_ms,
        facts.request_id,
        &*facts.client,
        facts.model,
        facts.upstream,
        facts.upstream_model,
        r.status,
        r.error_code,
        to_sql(r.prompt_tokens),
        to_sql(r.completion_tokens),
        to_sql(r.total_tokens),
        facts.images,
        to_sql(facts.image_bytes),
        facts.stream,
        facts.attempts,
        r.ttfb_ms.map(to_sql),
        to_sql(r.total_ms),
        facts.client_addr.map(super::address_text),
        facts.team.as_deref(),
        to_sql(r.cached_tokens),
        to_sql(r.reasoning_tokens),
        to_sql(r.cost.micros()),
        &*r.endpoint,
        r.cache_hit(),
    ])
}

/// The columns [`read_record`] reads, after the spool's `seq`.
pub(super) const RECORD_COLUMNS: &str = record_columns!();

/// A record as [`RECORD_COLUMNS`] hold it, from column `first` on.
pub(super) fn read_record(row: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<Record> {
    let at = |i: usize| first + i;
    let number = |i: usize| row.get::<_, Option<i64>>(at(i)).map(from_sql);
    let small = |i: usize| {
        row.get::<_, i64>(at(i))
            .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
    };
    let facts = RequestFacts {
        request_id: row.get(at(2))?,
        client: row.get::<_, String>(at(3))?.into(),
        model: row.get(at(4))?,
        upstream: row.get(at(5))?,
        upstream_model: row.get(at(6))?,
        images: small(12)?,
        image_bytes: number(13)?,
        stream: row.get(at(14))?,
        attempts: small(15)?,
        client_addr: row
            .get::<_, Option<String>>(at(18))?
            .and_then(|addr| addr.parse().ok()),
        team: row.get::<_, Option<String>>(at(19))?.map(Into::into),
        ..RequestFacts::default()
    };
    let endpoint: String = row.get(at(23))?;
    // The facts' API, for completeness: what is written is `endpoint`.
    let facts = RequestFacts {
        api: [Api::Chat, Api::Embeddings]
            .into_iter()
            .find(|api| api.as_str() == endpoint)
            .unwrap_or_default(),
        // Only a hit is told apart in a record.
        cache: row.get::<_, bool>(at(24))?.then_some(CacheOutcome::Hit),
        ..facts
    };
    Ok(Record {
        record_id: row.get(at(0))?,
        at_ms: row.get(at(1))?,
        facts: Arc::new(facts),
        status: u16::try_from(row.get::<_, i64>(at(7))?).unwrap_or(u16::MAX),
        error_code: row.get(at(8))?,
        prompt_tokens: number(9)?,
        completion_tokens: number(10)?,
        total_tokens: number(11)?,
        ttfb_ms: row
            .get::<_, Option<i64>>(at(16))?
            .map(|n| from_sql(Some(n))),
        total_ms: number(17)?,
        cached_tokens: number(20)?,
        reasoning_tokens: number(21)?,
        cost: Money::from_micros(number(22)?),
        endpoint: endpoint.into(),
    })
}

fn insert(db: &mut Connection, batch: &[Record]) -> rusqlite::Result<()> {
    let tx = db.transaction()?;
    insert_into(&tx, Table::Log, batch)?;
    tx.commit()
}

fn column(dimension: Dimension) -> &'static str {
    match dimension {
        Dimension::Client => "client",
        Dimension::Team => "team",
        Dimension::Model => "model",
        Dimension::Upstream => "upstream",
        Dimension::Endpoint => "endpoint",
        Dimension::Day => "strftime('%Y-%m-%d', at / 1000, 'unixepoch')",
    }
}

/// The aggregation: only fixed column expressions are spliced in; every
/// value is a parameter. Costs are summed as integers (micro-units), so a
/// group's cost is exact.
pub(super) fn totals_sql(
    query: &Query,
    column: fn(Dimension) -> &'static str,
    place: fn(usize) -> String,
) -> String {
    let keys: Vec<&str> = query.by.iter().map(|d| column(*d)).collect();
    let mut sql = String::from("SELECT ");
    for key in &keys {
        sql.push_str(key);
        sql.push_str(", ");
    }
    sql.push_str(
        "COUNT(*), \
         CAST(SUM(CASE WHEN status >= 400 OR error_code IS NOT NULL THEN 1 ELSE 0 END) AS BIGINT), \
         CAST(SUM(prompt_tokens) AS BIGINT), CAST(SUM(completion_tokens) AS BIGINT), \
         CAST(SUM(total_tokens) AS BIGINT), CAST(SUM(cost_micros) AS BIGINT) \
         FROM spend_log WHERE at >= ",
    );
    sql.push_str(&place(1));
    sql.push_str(" AND at < ");
    sql.push_str(&place(2));
    if query.client.is_some() {
        sql.push_str(" AND client = ");
        sql.push_str(&place(3));
    }
    if !keys.is_empty() {
        let list = |suffix: &str| {
            (1..=keys.len())
                .map(|i| format!("{i}{suffix}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        // The same order from both backends: PostgreSQL puts NULLs last.
        sql.push_str(&format!(
            " GROUP BY {} ORDER BY {}",
            list(""),
            list(" NULLS FIRST")
        ));
    }
    sql
}

/// Far enough in the future to stand for "until now and later".
pub(super) const END_OF_TIME_MS: i64 = 253_402_300_800_000; // 10000-01-01

fn totals(db: &Connection, query: &Query) -> rusqlite::Result<Vec<Totals>> {
    let sql = totals_sql(query, column, |i| format!("?{i}"));
    let mut statement = db.prepare(&sql)?;
    let until = query.until_ms.unwrap_or(END_OF_TIME_MS);
    let width = query.by.len();
    let read = |row: &rusqlite::Row<'_>| -> rusqlite::Result<Totals> {
        let mut keys = Vec::with_capacity(width);
        for i in 0..width {
            keys.push(row.get::<_, Option<String>>(i)?);
        }
        let number = |i: usize| row.get::<_, Option<i64>>(width + i).map(from_sql);
        Ok(Totals {
            keys,
            counts: Counts {
                requests: number(0)?,
                errors: number(1)?,
                prompt_tokens: number(2)?,
                completion_tokens: number(3)?,
                total_tokens: number(4)?,
                cost: Money::from_micros(number(5)?),
            },
        })
    };
    let rows = match &query.client {
        Some(client) => statement.query_map(params![query.since_ms, until, client], read)?,
        None => statement.query_map(params![query.since_ms, until], read)?,
    };
    rows.collect()
}

impl Sink for SqliteSink {
    fn write(&self, batch: Arc<[Record]>) -> SinkFuture<'_, ()> {
        self.blocking(move |db| insert(db, &batch))
    }

    fn delete_before(&self, cutoff_ms: i64) -> SinkFuture<'_, u64> {
        self.blocking(move |db| {
            db.execute("DELETE FROM spend_log WHERE at < ?1", [cutoff_ms])
                .map(|n| n as u64)
        })
    }

    fn totals<'a>(&'a self, query: &'a Query) -> SinkFuture<'a, Vec<Totals>> {
        let query = query.clone();
        self.blocking(move |db| totals(db, &query))
    }
}
