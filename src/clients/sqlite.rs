//! Managed clients and teams in the SQLite store's file: a table per kind,
//! and a version row bumped by every change, in the same transaction. Another process (the
//! `iris clients` command beside a running server) writes the same file;
//! the server sees the new version within a second.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, params};

use super::{Kind, Registry, RegistryError, RegistryFuture};

pub struct SqliteRegistry {
    connection: Arc<Mutex<Connection>>,
}

fn unavailable(e: impl std::fmt::Display) -> RegistryError {
    RegistryError::Unavailable(format!("sqlite: {e}"))
}

impl SqliteRegistry {
    pub fn open(path: &Path) -> Result<Self, String> {
        let connection = Self::connect(path)
            .map_err(|e| format!("managed clients: cannot open {}: {e}", path.display()))?;
        Ok(Self {
            connection: Arc::new(Mutex::new(connection)),
        })
    }

    fn connect(path: &Path) -> rusqlite::Result<Connection> {
        let connection = Connection::open(PathBuf::from(path))?;
        // The server and `iris clients` may write at once: wait, not fail.
        connection.busy_timeout(Duration::from_secs(5))?;
        connection.execute_batch(
            "CREATE TABLE IF NOT EXISTS managed_clients (
                 name TEXT PRIMARY KEY,
                 record TEXT NOT NULL
             );
             CREATE TABLE IF NOT EXISTS managed_teams (
                 name TEXT PRIMARY KEY,
                 record TEXT NOT NULL
             );
             CREATE TABLE IF NOT EXISTS managed_clients_version (
                 id INTEGER PRIMARY KEY CHECK (id = 1),
                 version INTEGER NOT NULL
             );
             INSERT OR IGNORE INTO managed_clients_version (id, version) VALUES (1, 0);",
        )?;
        Ok(connection)
    }

    /// Runs `f` on the connection, off the async threads.
    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, RegistryError> + Send + 'static,
    ) -> RegistryFuture<T> {
        let connection = Arc::clone(&self.connection);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let mut connection = connection
                    .lock()
                    .map_err(|_| RegistryError::Unavailable("poisoned".into()))?;
                f(&mut connection)
            })
            .await
            .map_err(unavailable)?
        })
    }
}

/// The table of a kind's records. (The version row, older than teams,
/// keeps its name: it counts every kind's changes.)
fn table(kind: Kind) -> &'static str {
    match kind {
        Kind::Client => "managed_clients",
        Kind::Team => "managed_teams",
    }
}

fn bump(transaction: &rusqlite::Transaction<'_>) -> Result<(), RegistryError> {
    transaction
        .execute(
            "UPDATE managed_clients_version SET version = version + 1 WHERE id = 1",
            [],
        )
        .map_err(unavailable)?;
    Ok(())
}

fn read_version(connection: &Connection) -> Result<u64, RegistryError> {
    let version: i64 = connection
        .query_row(
            "SELECT version FROM managed_clients_version WHERE id = 1",
            [],
            |row| row.get(0),
        )
        .map_err(unavailable)?;
    Ok(u64::try_from(version).unwrap_or(0))
}

/// Runs one write in a transaction that also bumps the version; `changed`
/// says whether a row was written (else `missing` is the error).
fn write(
    connection: &mut Connection,
    sql: &str,
    name: &str,
    record: Option<&str>,
    missing: RegistryError,
) -> Result<(), RegistryError> {
    let transaction = connection.transaction().map_err(unavailable)?;
    let changed = match record {
        Some(record) => transaction.execute(sql, params![name, record]),
        None => transaction.execute(sql, params![name]),
    }
    .map_err(unavailable)?;
    if changed == 0 {
        return Err(missing);
    }
    bump(&transaction)?;
    transaction.commit().map_err(unavailable)
}

impl Registry for SqliteRegistry {
    fn load_records(&self) -> RegistryFuture<(u64, Vec<(Kind, String)>)> {
        self.run(|connection| {
            let transaction = connection.transaction().map_err(unavailable)?;
            let version = read_version(&transaction)?;
            let mut records = Vec::new();
            for kind in Kind::ALL {
                let mut statement = transaction
                    .prepare(&format!("SELECT record FROM {} ORDER BY name", table(kind)))
                    .map_err(unavailable)?;
                let rows = statement
                    .query_map([], |row| row.get::<_, String>(0))
                    .map_err(unavailable)?;
                for text in rows {
                    records.push((kind, text.map_err(unavailable)?));
                }
            }
            Ok((version, records))
        })
    }

    fn version(&self) -> RegistryFuture<u64> {
        self.run(|connection| read_version(connection))
    }

    fn insert(&self, kind: Kind, name: String, record: String) -> RegistryFuture<()> {
        self.run(move |connection| {
            let sql = format!(
                "INSERT OR IGNORE INTO {} (name, record) VALUES (?1, ?2)",
                table(kind)
            );
            let taken = RegistryError::Exists(name.clone());
            write(connection, &sql, &name, Some(&record), taken)
        })
    }

    fn update(&self, kind: Kind, name: String, record: String) -> RegistryFuture<()> {
        self.run(move |connection| {
            let sql = format!("UPDATE {} SET record = ?2 WHERE name = ?1", table(kind));
            let missing = RegistryError::NotFound(name.clone());
            write(connection, &sql, &name, Some(&record), missing)
        })
    }

    fn remove(&self, kind: Kind, name: String) -> RegistryFuture<()> {
        self.run(move |connection| {
            let sql = format!("DELETE FROM {} WHERE name = ?1", table(kind));
            let missing = RegistryError::NotFound(name.clone());
            write(connection, &sql, &name, None, missing)
        })
    }
}
