//! Managed clients: clients an operator creates, changes, disables, rotates
//! and deletes at run time (admin API, `iris clients`), beside the config
//! file's. They live in the configured store ([`Registry`]: a table in the
//! SQLite file, a hash in Redis, or memory), so every instance sees them and
//! they survive restarts; only key hashes are stored.
//!
//! Each instance keeps an index of them in memory ([`ManagedClients`]) and
//! reloads it when the registry's version changes (checked every
//! [`WATCH_EVERY`]), so authentication never waits on the store and a
//! revoked key stops working everywhere within that interval.
//!
//! - [`ops`]: create, change, rotate, delete, with their validation
//! - [`memory`], [`sqlite`], [`redis`]: the registries

mod memory;
pub mod ops;
mod redis;
mod sqlite;

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::budget::{Limits, StoreBackend};
use crate::catalog::{Client, ModelAccess};
use crate::keys::KeyHash;

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
    /// RFC 3339 (as `ops` wrote it, in UTC): from then on its keys get
    /// `key_expired`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// CIDRs its requests may come from; empty: anywhere.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_networks: Vec<String>,
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
    #[error("a client named {0:?} exists already")]
    Exists(String),
    #[error("no managed client named {0:?}")]
    NotFound(String),
    #[error("the client store is unavailable: {0}")]
    Unavailable(String),
}

pub type RegistryFuture<T> = BoxFuture<'static, Result<T, RegistryError>>;

/// Where managed clients are kept. Every change bumps a version, which
/// instances watch.
pub trait Registry: Send + Sync + 'static {
    /// Every managed client, with the version they are at.
    fn load(&self) -> RegistryFuture<(u64, Vec<ManagedClient>)>;
    /// The version now (cheap: asked every [`WATCH_EVERY`]).
    fn version(&self) -> RegistryFuture<u64>;
    /// Adds `client`; fails with `Exists` if its name is taken.
    fn create(&self, client: ManagedClient) -> RegistryFuture<()>;
    /// Replaces the client of that name; fails with `NotFound`.
    fn replace(&self, client: ManagedClient) -> RegistryFuture<()>;
    /// Deletes it; fails with `NotFound`.
    fn delete(&self, name: &str) -> RegistryFuture<()>;
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

/// The managed clients this instance knows, indexed by key hash.
#[derive(Default)]
pub struct Index {
    pub version: u64,
    by_key: HashMap<KeyHash, (Arc<Client>, Option<u64>)>,
    /// As stored, by name, for listing.
    pub clients: Vec<ManagedClient>,
}

impl Index {
    fn build(version: u64, clients: Vec<ManagedClient>) -> Self {
        let mut by_key = HashMap::new();
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
        let mut clients = clients;
        clients.sort_by(|a, b| a.name.cmp(&b.name));
        Self {
            version,
            by_key,
            clients,
        }
    }

    /// The enabled managed client whose (unexpired) key is `presented`.
    ///
    /// Looked up by the SHA-256 of the presented key: what a lookup's timing
    /// could reveal is about digests, which say nothing of any stored key,
    /// and the index stays one lookup however many clients there are.
    pub fn authenticate(&self, presented: &str) -> Option<&Arc<Client>> {
        let (client, expires_at) = self.by_key.get(&KeyHash::of(presented))?;
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
        let index = match registry.load().await {
            Ok((version, clients)) => Index::build(version, clients),
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
            Ok(_) => match self.registry.load().await {
                Ok((version, clients)) => {
                    self.index.store(Arc::new(Index::build(version, clients)));
                }
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
