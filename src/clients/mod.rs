//! Managed clients and teams: clients an operator creates, changes,
//! disables, rotates and deletes at run time (admin API, `iris clients`),
//! beside the config file's, and the teams whose budgets they share (`iris
//! teams`). They live in the configured store ([`Registry`]: a table per
//! [`Kind`] in the SQLite file, a hash per kind in Redis, or memory), so
//! every instance sees them and they survive restarts; only key hashes are
//! stored.
//!
//! Each instance keeps an index of them in memory ([`ManagedClients`]) and
//! reloads it when the registry's version (one for every kind) changes
//! (checked every [`WATCH_EVERY`]), so authentication never waits on the
//! store and a revoked key stops working everywhere within that interval.
//!
//! - [`ops`]: clients: create, change, rotate, delete, with their validation
//! - [`teams`]: teams: create, change, delete, with theirs
//! - [`memory`], [`sqlite`], [`redis`]: the registries

mod memory;
pub mod ops;
mod redis;
mod sqlite;
pub mod teams;

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::budget::{Limits, StoreBackend};
use crate::catalog::{Client, ModelAccess, Team};
use crate::keys::{KeyHash, KeyIndex};

pub use memory::MemoryRegistry;
pub use redis::RedisRegistry;
pub use sqlite::SqliteRegistry;

/// How often each instance asks the registry whether anything changed.
pub const WATCH_EVERY: Duration = Duration::from_secs(1);

/// A managed client as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagedClient {
    pub name: String,
    /// Its keys' hashes: the current one, and a rotated-out one until its
    /// grace period ends.
    pub keys: Vec<StoredKey>,
    /// Model names it may use; `"*"` allows all.
    pub models: Vec<String>,
    pub budget: Limits,
    pub disabled: bool,
    /// Unix seconds.
    pub created_at: u64,
    /// The team whose budget its requests also count against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    /// RFC 3339 (as `ops` wrote it, in UTC): from then on its keys get
    /// `key_expired`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// CIDRs its requests may come from; empty: anywhere.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_networks: Vec<String>,
}

/// A managed team as stored: a budget its clients share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagedTeam {
    pub name: String,
    pub budget: Limits,
    /// Unix seconds.
    pub created_at: u64,
}

/// A kind of record a registry keeps, each kind's names its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Client,
    Team,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::Client, Kind::Team];

    /// For messages.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Client => "client",
            Kind::Team => "team",
        }
    }
}

/// A record a registry keeps, stored as JSON under its kind and name.
pub trait Record: Serialize + DeserializeOwned + Send + 'static {
    const KIND: Kind;
    fn name(&self) -> &str;
}

impl Record for ManagedClient {
    const KIND: Kind = Kind::Client;
    fn name(&self) -> &str {
        &self.name
    }
}

impl Record for ManagedTeam {
    const KIND: Kind = Kind::Team;
    fn name(&self) -> &str {
        &self.name
    }
}

/// Everything a registry holds, at one version.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    pub version: u64,
    pub clients: Vec<ManagedClient>,
    pub teams: Vec<ManagedTeam>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredKey {
    /// `sha256:<hex>`.
    pub hash: String,
    /// Unix seconds after which the key no longer works (a rotated-out key).
    pub expires_at: Option<u64>,
}

/// Why a registry operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("the name {0:?} is taken")]
    Exists(String),
    #[error("nothing managed is named {0:?}")]
    NotFound(String),
    #[error("the client store is unavailable: {0}")]
    Unavailable(String),
}

pub type RegistryFuture<T> = BoxFuture<'static, Result<T, RegistryError>>;

/// Where managed clients and teams are kept: named records (JSON text) of
/// each [`Kind`]. Every change, of any kind, bumps one version, which
/// instances watch. The typed operations are on `dyn Registry` below.
pub trait Registry: Send + Sync + 'static {
    /// Every record of every kind, with the version they are at.
    fn load_records(&self) -> RegistryFuture<(u64, Vec<(Kind, String)>)>;
    /// The version now (cheap: asked every [`WATCH_EVERY`]).
    fn version(&self) -> RegistryFuture<u64>;
    /// Adds a record; fails with `Exists` if its kind has one of that name.
    fn insert(&self, kind: Kind, name: String, record: String) -> RegistryFuture<()>;
    /// Replaces the record of that kind and name; fails with `NotFound`.
    fn update(&self, kind: Kind, name: String, record: String) -> RegistryFuture<()>;
    /// Deletes it; fails with `NotFound`.
    fn remove(&self, kind: Kind, name: String) -> RegistryFuture<()>;
}

impl dyn Registry {
    /// Every managed client and team, with the version they are at. A
    /// record that does not parse is logged and left out.
    pub fn load_all(&self) -> RegistryFuture<Loaded> {
        let records = self.load_records();
        Box::pin(async move {
            let (version, records) = records.await?;
            let mut loaded = Loaded {
                version,
                ..Loaded::default()
            };
            for (kind, text) in records {
                let parsed = match kind {
                    Kind::Client => serde_json::from_str(&text).map(|c| loaded.clients.push(c)),
                    Kind::Team => serde_json::from_str(&text).map(|t| loaded.teams.push(t)),
                };
                if let Err(e) = parsed {
                    tracing::error!("a managed {} record is unreadable: {e}", kind.label());
                }
            }
            loaded.clients.sort_by(|a, b| a.name.cmp(&b.name));
            loaded.teams.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(loaded)
        })
    }

    /// Every managed client, with the version they are at.
    pub fn load(&self) -> RegistryFuture<(u64, Vec<ManagedClient>)> {
        let loaded = self.load_all();
        Box::pin(async move {
            let loaded = loaded.await?;
            Ok((loaded.version, loaded.clients))
        })
    }

    /// Adds `record`; fails with `Exists` if its name is taken (by its kind).
    pub fn create<R: Record>(&self, record: R) -> RegistryFuture<()> {
        match to_json(&record) {
            Ok(text) => self.insert(R::KIND, record.name().to_owned(), text),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }

    /// Replaces the record of that kind and name; fails with `NotFound`.
    pub fn replace<R: Record>(&self, record: R) -> RegistryFuture<()> {
        match to_json(&record) {
            Ok(text) => self.update(R::KIND, record.name().to_owned(), text),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }

    /// Deletes the managed client `name`; fails with `NotFound`.
    pub fn delete(&self, name: &str) -> RegistryFuture<()> {
        self.remove(Kind::Client, name.to_owned())
    }
}

fn to_json(record: &impl Record) -> Result<String, RegistryError> {
    serde_json::to_string(record).map_err(|e| RegistryError::Unavailable(e.to_string()))
}

/// The registry of the configured store.
pub fn open(backend: &StoreBackend) -> Result<Arc<dyn Registry>, String> {
    Ok(match backend {
        StoreBackend::Memory => Arc::new(MemoryRegistry::default()),
        StoreBackend::Sqlite { path } => Arc::new(SqliteRegistry::open(path)?),
        StoreBackend::Redis { url, options } => {
            Arc::new(RedisRegistry::connect(url.expose(), options)?)
        }
    })
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    unix_now_ms() / 1000
}

/// Unix milliseconds now.
pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The managed clients this instance knows, indexed by key hash, and the
/// managed teams, by name.
#[derive(Default)]
pub struct Index {
    pub version: u64,
    by_key: KeyIndex<(Arc<Client>, Option<u64>)>,
    /// As stored, by name, for listing.
    pub clients: Vec<ManagedClient>,
    /// As stored, by name, for listing.
    pub teams: Vec<ManagedTeam>,
    by_team: HashMap<String, Arc<Team>>,
}

impl Index {
    fn build(loaded: Loaded) -> Self {
        let Loaded {
            version,
            clients,
            teams,
        } = loaded;
        let mut by_key = KeyIndex::default();
        for managed in clients.iter().filter(|c| !c.disabled) {
            let client = Arc::new(Client {
                name: Arc::from(managed.name.as_str()),
                key: managed
                    .keys
                    .first()
                    .and_then(|k| KeyHash::parse(&k.hash).ok())
                    .unwrap_or_else(|| KeyHash::of("")),
                models: model_access(&managed.models),
                budget: managed.budget,
                team: managed.team.as_deref().map(Arc::from),
                // Written checked by `ops`; a value that no longer parses
                // (edited in the store by hand) locks the key rather than
                // lifting its policy.
                expires_at: managed
                    .expires_at
                    .as_deref()
                    .map(|text| crate::config::parse_instant(text).unwrap_or(jiff::Timestamp::MIN)),
                allowed_networks: managed
                    .allowed_networks
                    .iter()
                    .map(|text| {
                        crate::client_addr::parse_network(text).unwrap_or_else(|_| {
                            ipnet::IpNet::from(std::net::IpAddr::from(
                                std::net::Ipv6Addr::UNSPECIFIED,
                            ))
                        })
                    })
                    .collect(),
            });
            for key in &managed.keys {
                if let Ok(hash) = KeyHash::parse(&key.hash) {
                    by_key.insert(hash, (Arc::clone(&client), key.expires_at));
                }
            }
        }
        let by_team = teams
            .iter()
            .map(|team| {
                let resolved = Team {
                    name: Arc::from(team.name.as_str()),
                    budget: team.budget,
                };
                (team.name.clone(), Arc::new(resolved))
            })
            .collect();
        Self {
            version,
            by_key,
            clients,
            teams,
            by_team,
        }
    }

    /// The managed team of that name (a config team of the same name wins
    /// over it: see `AppState::team`).
    pub fn team(&self, name: &str) -> Option<&Arc<Team>> {
        self.by_team.get(name)
    }

    /// The enabled managed client whose (unexpired) key hashes to `presented`.
    ///
    /// One lookup however many clients there are, the hash compared in
    /// constant time ([`KeyIndex`]).
    pub fn authenticate(&self, presented: &KeyHash) -> Option<&Arc<Client>> {
        let (client, expires_at) = self.by_key.get(presented)?;
        expires_at
            .is_none_or(|at| unix_now() < at)
            .then_some(client)
    }
}

pub fn model_access(models: &[String]) -> ModelAccess {
    if models.iter().any(|m| m == "*") {
        ModelAccess::All
    } else {
        ModelAccess::Only(models.to_vec())
    }
}

/// The live index of managed clients, kept current from the registry.
pub struct ManagedClients {
    registry: Arc<dyn Registry>,
    index: ArcSwap<Index>,
}

impl ManagedClients {
    /// Loads the registry (an empty index if it does not answer yet: the
    /// watcher retries) and starts watching it.
    pub async fn start(registry: Arc<dyn Registry>) -> Arc<Self> {
        let index = match registry.load_all().await {
            Ok(loaded) => Index::build(loaded),
            Err(e) => {
                tracing::warn!("managed clients not loaded yet: {e}");
                Index::default()
            }
        };
        let managed = Arc::new(Self {
            registry,
            index: ArcSwap::from_pointee(index),
        });
        watch(Arc::downgrade(&managed));
        managed
    }

    pub fn registry(&self) -> &Arc<dyn Registry> {
        &self.registry
    }

    pub fn index(&self) -> arc_swap::Guard<Arc<Index>> {
        self.index.load()
    }

    /// Reloads the index now if the registry changed (after this
    /// instance's own change, so it takes effect here at once).
    pub async fn refresh(&self) {
        let known = self.index.load().version;
        match self.registry.version().await {
            Ok(version) if version == known => {}
            Ok(_) => match self.registry.load_all().await {
                Ok(loaded) => self.index.store(Arc::new(Index::build(loaded))),
                Err(e) => tracing::warn!("managed clients not reloaded: {e}"),
            },
            Err(e) => tracing::debug!("managed clients' version not read: {e}"),
        }
    }
}

fn watch(managed: Weak<ManagedClients>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(WATCH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(managed) = managed.upgrade() else {
                return;
            };
            managed.refresh().await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(name: &str, team: Option<&str>) -> ManagedClient {
        ManagedClient {
            name: name.into(),
            keys: vec![StoredKey {
                hash: KeyHash::of(name).to_string(),
                expires_at: None,
            }],
            models: vec!["*".into()],
            budget: Limits::default(),
            disabled: false,
            created_at: 1,
            team: team.map(str::to_owned),
            expires_at: None,
            allowed_networks: Vec::new(),
        }
    }

    fn team(name: &str, tokens_per_day: u64) -> ManagedTeam {
        ManagedTeam {
            name: name.into(),
            budget: Limits {
                tokens_per_day: Some(tokens_per_day),
                ..Limits::default()
            },
            created_at: 2,
        }
    }

    /// Each kind's names are its own, one version counts both, and a
    /// record of one kind never reads as the other.
    async fn kinds_are_kept_apart(registry: &dyn Registry) {
        registry.create(client("blue", Some("blue"))).await.unwrap();
        let before = registry.version().await.unwrap();
        registry.create(team("blue", 10)).await.unwrap();
        assert!(registry.version().await.unwrap() > before);
        assert_eq!(
            registry.create(team("blue", 20)).await,
            Err(RegistryError::Exists("blue".into()))
        );
        registry.replace(team("blue", 30)).await.unwrap();
        assert_eq!(
            registry.replace(team("green", 1)).await,
            Err(RegistryError::NotFound("green".into()))
        );
        let loaded = registry.load_all().await.unwrap();
        assert_eq!(loaded.clients, [client("blue", Some("blue"))]);
        assert_eq!(loaded.teams, [team("blue", 30)]);
        assert_eq!(registry.load().await.unwrap().1.len(), 1);

        let index = Index::build(loaded);
        assert_eq!(
            index.team("blue").map(|t| t.budget.tokens_per_day),
            Some(Some(30))
        );
        let authenticated = index
            .authenticate(&KeyHash::of("blue"))
            .expect("the client's key");
        assert_eq!(authenticated.team.as_deref(), Some("blue"));

        registry.remove(Kind::Team, "blue".into()).await.unwrap();
        let loaded = registry.load_all().await.unwrap();
        assert!(loaded.teams.is_empty());
        assert_eq!(loaded.clients.len(), 1, "the client of that name stays");
        assert_eq!(
            registry.remove(Kind::Team, "blue".into()).await,
            Err(RegistryError::NotFound("blue".into()))
        );
    }

    #[tokio::test]
    async fn memory_keeps_clients_and_teams_apart() {
        kinds_are_kept_apart(&MemoryRegistry::default()).await;
    }

    #[tokio::test]
    async fn sqlite_keeps_clients_and_teams_apart_and_reads_older_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("iris.db");
        {
            // A client written before teams existed: no `team` field.
            let connection = rusqlite::Connection::open(&path).unwrap();
            connection
                .execute_batch(
                    "CREATE TABLE managed_clients (name TEXT PRIMARY KEY, record TEXT NOT NULL);
                     INSERT INTO managed_clients VALUES ('old', '{\"name\":\"old\",\"keys\":[],\
                     \"models\":[\"*\"],\"budget\":{},\"disabled\":false,\"created_at\":5}');",
                )
                .unwrap();
        }
        let registry = SqliteRegistry::open(&path).unwrap();
        let loaded = (&registry as &dyn Registry).load_all().await.unwrap();
        assert_eq!(loaded.clients.len(), 1);
        assert_eq!(loaded.clients[0].team, None);
        let registry: &dyn Registry = &registry;
        registry.delete("old").await.unwrap();
        kinds_are_kept_apart(registry).await;
    }
}
