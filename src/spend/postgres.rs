//! The PostgreSQL sink, for many instances writing one log: one connection
//! (over TLS as the URL's `sslmode` says, see [`tls`]), opened when first
//! needed and again after it broke, so Iris starts and serves while the
//! database is down or refuses the handshake; the schema is migrated on each
//! new connection, under an advisory lock. A batch is one `INSERT … SELECT
//! FROM UNNEST(…)` that skips the records already there (by `record_id`),
//! so a batch sent again after its acknowledgement was lost lands once.

mod tls;

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Config, NoTls, Socket};

use super::migrations::{self, COMPONENT};
use super::report::{Counts, Dimension, Query, Totals};
use super::sqlite::{END_OF_TIME_MS, totals_sql};
use super::{Record, Sink, SinkError, SinkFuture};
use crate::budget::money::Money;
use crate::secret::Secret;
use crate::tls::PrivateCa;
pub use tls::TlsMode;

/// Connecting gives up after this long unless the URL sets `connect_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Serializes migrations across instances (`pg_advisory_xact_lock`).
const MIGRATION_LOCK: i64 = 0x6972_6973_5350_454e; // "irisSPEN"

pub struct PostgresSink {
    config: Config,
    /// How connections are secured; built once, and an error (no platform
    /// roots, say) only fails each connection attempt, so the records wait
    /// instead of Iris refusing to start.
    tls: Result<Option<tls::MakeRustls>, String>,
    client: tokio::sync::Mutex<Option<Client>>,
}

/// Checks a `spend_log.url`: what is wrong with it, never the URL itself
/// (it may hold a password). Returns the connection's config and its
/// `sslmode`.
pub fn check_url(url: &str) -> Result<(Config, TlsMode), String> {
    let (url, mode) = tls::take_sslmode(url)?;
    let mut config = Config::from_str(&url)
        .map_err(|_| "not a valid PostgreSQL URL (postgres://user:password@host:port/database)")?;
    config.ssl_mode(mode.ssl_mode());
    if config.get_hosts().is_empty() {
        return Err("names no host".into());
    }
    Ok((config, mode))
}

fn error(e: &tokio_postgres::Error) -> SinkError {
    // `Display` of a database error carries its message; connection errors
    // say what failed. Neither carries the password.
    SinkError(format!("postgres: {e}"))
}

impl PostgresSink {
    /// A sink for `url`, its server's certificate checked against `ca`
    /// too (`sslmode=verify-full`); nothing is connected until the first
    /// operation.
    pub fn new(url: &Secret, ca: Option<&PrivateCa>) -> Result<Self, SinkError> {
        let (mut config, mode) = check_url(url.expose()).map_err(SinkError)?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("iris");
        }
        Ok(Self {
            config,
            tls: tls::MakeRustls::for_mode(mode, ca),
            client: tokio::sync::Mutex::new(None),
        })
    }

    /// Runs `work` on the connection, connecting (and migrating) first if
    /// there is none; a connection that broke is dropped, for the next
    /// operation to open another.
    async fn with_client<T>(
        &self,
        work: impl AsyncFnOnce(&mut Client) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, SinkError> {
        let mut slot = self.client.lock().await;
        if slot.as_ref().is_none_or(Client::is_closed) {
            *slot = None;
            *slot = Some(self.connect().await?);
        }
        let Some(client) = slot.as_mut() else {
            return Err(SinkError("postgres: not connected".into()));
        };
        let result = work(client).await;
        if client.is_closed() {
            *slot = None;
        }
        result.map_err(|e| error(&e))
    }

    async fn connect(&self) -> Result<Client, SinkError> {
        let mut client = match &self.tls {
            Ok(None) => open(&self.config, NoTls).await,
            Ok(Some(tls)) => open(&self.config, tls.clone()).await,
            Err(e) => return Err(SinkError(format!("postgres: {e}"))),
        }
        .map_err(|e| error(&e))?;
        migrate(&mut client).await?;
        Ok(client)
    }
}

/// A connection through `tls`, its I/O driven by a task of its own.
async fn open<T>(config: &Config, tls: T) -> Result<Client, tokio_postgres::Error>
where
    T: MakeTlsConnect<Socket>,
    T::Stream: Send + 'static,
{
    let (client, connection) = config.connect(tls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!("spend log: postgres connection closed: {e}");
        }
    });
    Ok(client)
}

async fn migrate(client: &mut Client) -> Result<(), SinkError> {
    let tx = client.transaction().await.map_err(|e| error(&e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(|e| error(&e))?;
    tx.batch_execute(migrations::POSTGRES_VERSION_TABLE)
        .await
        .map_err(|e| error(&e))?;
    let current: i64 = tx
        .query_opt(
            "SELECT version FROM schema_version WHERE component = $1",
            &[&COMPONENT],
        )
        .await
        .map_err(|e| error(&e))?
        .map_or(0, |row| row.get(0));
    let pending = migrations::pending(migrations::POSTGRES, current).map_err(SinkError)?;
    let Some(last) = pending.last() else {
        return Ok(());
    };
    for migration in pending {
        tx.batch_execute(migration.sql)
            .await
            .map_err(|e| SinkError(format!("postgres: migration {}: {e}", migration.version)))?;
    }
    tx.execute(
        "INSERT INTO schema_version (component, version) VALUES ($1, $2)
         ON CONFLICT (component) DO UPDATE SET version = excluded.version",
        &[&COMPONENT, &last.version],
    )
    .await
    .map_err(|e| error(&e))?;
    tx.commit().await.map_err(|e| error(&e))?;
    tracing::info!(
        version = last.version,
        "spend log: postgres schema migrated"
    );
    Ok(())
}

fn time(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

fn to_sql(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn to_int(value: u32) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

const INSERT: &str = "INSERT INTO spend_log (at, request_id, client, model, upstream,
    upstream_model, status, error_code, prompt_tokens, completion_tokens, total_tokens, images,
    image_bytes, stream, attempts, ttfb_ms, total_ms, client_addr, team, cached_tokens,
    reasoning_tokens, cost_micros, endpoint, record_id, cache_hit)
  SELECT * FROM UNNEST($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[],
    $6::text[], $7::int4[], $8::text[], $9::int8[], $10::int8[], $11::int8[], $12::int4[],
    $13::int8[], $14::bool[], $15::int4[], $16::int8[], $17::int8[], $18::text[], $19::text[],
    $20::int8[], $21::int8[], $22::int8[], $23::text[], $24::text[], $25::bool[])
  ON CONFLICT (record_id) DO NOTHING";

async fn insert(client: &mut Client, batch: &[Record]) -> Result<(), tokio_postgres::Error> {
    let at: Vec<SystemTime> = batch.iter().map(|r| time(r.at_ms)).collect();
    let request_id: Vec<&str> = batch.iter().map(|r| r.facts.request_id.as_str()).collect();
    let client_name: Vec<&str> = batch.iter().map(|r| &*r.facts.client).collect();
    let model: Vec<Option<&str>> = batch.iter().map(|r| r.facts.model.as_deref()).collect();
    let upstream: Vec<Option<&str>> = batch.iter().map(|r| r.facts.upstream.as_deref()).collect();
    let upstream_model: Vec<Option<&str>> = batch
        .iter()
        .map(|r| r.facts.upstream_model.as_deref())
        .collect();
    let status: Vec<i32> = batch.iter().map(|r| i32::from(r.status)).collect();
    let error_code: Vec<Option<&str>> = batch.iter().map(|r| r.error_code.as_deref()).collect();
    let prompt: Vec<i64> = batch.iter().map(|r| to_sql(r.prompt_tokens)).collect();
    let completion: Vec<i64> = batch.iter().map(|r| to_sql(r.completion_tokens)).collect();
    let total: Vec<i64> = batch.iter().map(|r| to_sql(r.total_tokens)).collect();
    let images: Vec<i32> = batch.iter().map(|r| to_int(r.facts.images)).collect();
    let image_bytes: Vec<i64> = batch.iter().map(|r| to_sql(r.facts.image_bytes)).collect();
    let stream: Vec<bool> = batch.iter().map(|r| r.facts.stream).collect();
    let attempts: Vec<i32> = batch.iter().map(|r| to_int(r.facts.attempts)).collect();
    let ttfb: Vec<Option<i64>> = batch.iter().map(|r| r.ttfb_ms.map(to_sql)).collect();
    let total_ms: Vec<i64> = batch.iter().map(|r| to_sql(r.total_ms)).collect();
    let client_addr: Vec<Option<String>> = batch
        .iter()
        .map(|r| {
            r.facts
                .client_addr
                .map(|addr| super::address_text(addr).as_str().to_owned())
        })
        .collect();
    let team: Vec<Option<&str>> = batch.iter().map(|r| r.facts.team.as_deref()).collect();
    let cached: Vec<i64> = batch.iter().map(|r| to_sql(r.cached_tokens)).collect();
    let reasoning: Vec<i64> = batch.iter().map(|r| to_sql(r.reasoning_tokens)).collect();
    let cost: Vec<i64> = batch.iter().map(|r| to_sql(r.cost.micros())).collect();
    let endpoint: Vec<&str> = batch.iter().map(|r| &*r.endpoint).collect();
    let record_id: Vec<&str> = batch.iter().map(|r| r.record_id.as_str()).collect();
    let cache_hit: Vec<bool> = batch.iter().map(Record::cache_hit).collect();
    // One statement per batch, not per record: its preparation is cheap.
    client
        .execute(
            INSERT,
            &[
                &at,
                &request_id,
                &client_name,
                &model,
                &upstream,
                &upstream_model,
                &status,
                &error_code,
                &prompt,
                &completion,
                &total,
                &images,
                &image_bytes,
                &stream,
                &attempts,
                &ttfb,
                &total_ms,
                &client_addr,
                &team,
                &cached,
                &reasoning,
                &cost,
                &endpoint,
                &record_id,
                &cache_hit,
            ],
        )
        .await?;
    Ok(())
}

fn column(dimension: Dimension) -> &'static str {
    match dimension {
        Dimension::Client => "client",
        Dimension::Team => "team",
        Dimension::Model => "model",
        Dimension::Upstream => "upstream",
        Dimension::Endpoint => "endpoint",
        Dimension::Day => "to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    }
}

async fn totals(client: &mut Client, query: &Query) -> Result<Vec<Totals>, tokio_postgres::Error> {
    let sql = totals_sql(query, column, |i| match i {
        1 | 2 => format!("${i}::timestamptz"),
        _ => format!("${i}"),
    });
    let since = time(query.since_ms);
    let until = time(query.until_ms.unwrap_or(END_OF_TIME_MS));
    let rows = match &query.client {
        Some(name) => client.query(&sql, &[&since, &until, name]).await?,
        None => client.query(&sql, &[&since, &until]).await?,
    };
    let width = query.by.len();
    let number = |row: &tokio_postgres::Row, i: usize| {
        row.get::<_, Option<i64>>(width + i)
            .and_then(|n| u64::try_from(n).ok())
            .unwrap_or(0)
    };
    Ok(rows
        .iter()
        .map(|row| Totals {
            keys: (0..width)
                .map(|i| row.get::<_, Option<String>>(i))
                .collect(),
            counts: Counts {
                requests: number(row, 0),
                errors: number(row, 1),
                prompt_tokens: number(row, 2),
                completion_tokens: number(row, 3),
                total_tokens: number(row, 4),
                cost: Money::from_micros(number(row, 5)),
            },
        })
        .collect())
}

impl Sink for PostgresSink {
    fn write(&self, batch: Arc<[Record]>) -> SinkFuture<'_, ()> {
        Box::pin(async move {
            self.with_client(async move |client: &mut Client| insert(client, &batch).await)
                .await
        })
    }

    fn delete_before(&self, cutoff_ms: i64) -> SinkFuture<'_, u64> {
        Box::pin(async move {
            let cutoff = time(cutoff_ms);
            self.with_client(async move |client: &mut Client| {
                client
                    .execute("DELETE FROM spend_log WHERE at < $1", &[&cutoff])
                    .await
            })
            .await
        })
    }

    fn totals<'a>(&'a self, query: &'a Query) -> SinkFuture<'a, Vec<Totals>> {
        Box::pin(async move {
            self.with_client(async move |client: &mut Client| totals(client, query).await)
                .await
        })
    }
}
