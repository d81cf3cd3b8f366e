//! Managed clients in the SQLite store's file: one table, and a version row
//! bumped by every change, in the same transaction. Another process (the
//! `iris clients` command beside a running server) writes the same file;
//! the server sees the new version within a second.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

use super::{ManagedClient, Registry, RegistryError, RegistryFuture};

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

fn record(client: &ManagedClient) -> Result<String, RegistryError> {
    serde_json::to_string(client).map_err(unavailable)
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

impl Registry for SqliteRegistry {
    fn load(&self) -> RegistryFuture<(u64, Vec<ManagedClient>)> {
        self.run(|connection| {
            let transaction = connection.transaction().map_err(unavailable)?;
            let version: i64 = transaction
                .query_row(
                    "SELECT version FROM managed_clients_version WHERE id = 1",
                    [],
                    |row| row.get(0),
                )
                .map_err(unavailable)?;
            let mut statement = transaction
                .prepare("SELECT record FROM managed_clients ORDER BY name")
                .map_err(unavailable)?;
            let records = statement
                .query_map([], |row| row.get::<_, String>(0))
                .map_err(unavailable)?;
            let mut clients = Vec::new();
            for text in records {
                let text = text.map_err(unavailable)?;
                match serde_json::from_str(&text) {
                    Ok(client) => clients.push(client),
                    Err(e) => tracing::error!("a managed client record is unreadable: {e}"),
                }
            }
            Ok((u64::try_from(version).unwrap_or(0), clients))
        })
    }

    fn version(&self) -> RegistryFuture<u64> {
        self.run(|connection| {
            let version: i64 = connection
                .query_row(
                    "SELECT version FROM managed_clients_version WHERE id = 1",
                    [],
                    |row| row.get(0),
                )
                .map_err(unavailable)?;
            Ok(u64::try_from(version).unwrap_or(0))
        })
    }

    fn create(&self, client: ManagedClient) -> RegistryFuture<()> {
        self.run(move |connection| {
            let transaction = connection.transaction().map_err(unavailable)?;
            let inserted = transaction
                .execute(
                    "INSERT OR IGNORE INTO managed_clients (name, record) VALUES (?1, ?2)",
                    params![client.name, record(&client)?],
                )
                .map_err(unavailable)?;
            if inserted == 0 {
                return Err(RegistryError::Exists(client.name));
            }
            bump(&transaction)?;
            transaction.commit().map_err(unavailable)
        })
    }

    fn replace(&self, client: ManagedClient) -> RegistryFuture<()> {
        self.run(move |connection| {
            let transaction = connection.transaction().map_err(unavailable)?;
            let updated = transaction
                .execute(
                    "UPDATE managed_clients SET record = ?2 WHERE name = ?1",
                    params![client.name, record(&client)?],
                )
                .map_err(unavailable)?;
            if updated == 0 {
                return Err(RegistryError::NotFound(client.name));
            }
            bump(&transaction)?;
            transaction.commit().map_err(unavailable)
        })
    }

    fn delete(&self, name: &str) -> RegistryFuture<()> {
        let name = name.to_owned();
        self.run(move |connection| {
            let transaction = connection.transaction().map_err(unavailable)?;
            let found: Option<String> = transaction
                .query_row(
                    "SELECT name FROM managed_clients WHERE name = ?1",
                    params![name],
                    |row| row.get(0),
                )
                .optional()
                .map_err(unavailable)?;
            if found.is_none() {
                return Err(RegistryError::NotFound(name));
            }
            transaction
                .execute("DELETE FROM managed_clients WHERE name = ?1", params![name])
                .map_err(unavailable)?;
            bump(&transaction)?;
            transaction.commit().map_err(unavailable)
        })
    }
}
