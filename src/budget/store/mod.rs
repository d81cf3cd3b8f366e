//! Where budget state lives, behind one small trait so the request path does
//! not care: [`MemoryStore`] (tests, throwaway runs), [`SqliteStore`] (the
//! embedded default: memory first, written to a file before a response's
//! last byte and every second) and
//! [`RedisStore`] (shared by several instances).
//!
//! Each operation is one call that a backend must perform atomically for the
//! account: `reserve` checks and charges every window together (the Redis
//! store does it in one Lua script), and `settle` corrects it in one step.
//! Time is passed in, so every backend and every test agrees on "now"
//! (the Redis store uses Redis's clock instead, shared by every instance).
//!
//! [`Stores::open`] opens the configured backend; the Redis store also
//! shares deployment health between instances, as a [`SharedHealth`].

mod memory;
mod redis;
mod sqlite;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

#[cfg(test)]
pub(crate) use self::redis::tests as redis_tests;
pub use self::redis::{
    Deployment as RedisDeployment, LAYOUT as REDIS_LAYOUT, Lua, LuaCall, RedisClock,
    RedisConnection, RedisOptions, RedisStore,
};
pub use memory::MemoryStore;
pub use sqlite::{FLUSH_EVERY, SqliteStore};

use super::window::{Hold, Refusal, Snapshot};
use super::{Account, StoreBackend};
use crate::budget::Limits;
use crate::shared_health::SharedHealth;

/// The future every store operation returns. `'static` so that settling can
/// be spawned from a `Drop` (a client that hung up) and outlive the request.
pub type StoreFuture<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'static>>;

/// The store did not answer (Redis down, disk full): the request path turns
/// it into 503 `store_unavailable` or admits, as `store.on_unavailable` says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

/// The result of a reservation, with the windows as they stand after it (for
/// the `x-ratelimit-*` headers).
#[derive(Debug, Clone, Copy)]
pub struct Reserved {
    pub outcome: Result<Hold, Refusal>,
    pub snapshot: Snapshot,
}

pub trait Store: Send + Sync + 'static {
    /// Atomically reserves `tokens`, one request and one concurrency slot
    /// against every window of `account`, or reserves nothing and says why.
    fn reserve(
        &self,
        account: &Account,
        limits: &Limits,
        tokens: u64,
        now: u64,
    ) -> StoreFuture<Reserved>;

    /// Replaces the tokens `hold` reserved by `actual` and frees its slot.
    /// With `actual = 0` it gives back everything but the request it
    /// counted (the upstream failed, or Iris refused the request after
    /// reserving).
    fn settle(
        &self,
        account: &Account,
        limits: &Limits,
        hold: Hold,
        actual: u64,
        now: u64,
    ) -> StoreFuture<()>;

    /// The account's windows at `now`, without changing them.
    fn snapshot(&self, account: &Account, limits: &Limits, now: u64) -> StoreFuture<Snapshot>;

    /// Ok when the store answers (and, for a persistent one, persists).
    fn health(&self) -> StoreFuture<()>;

    /// Writes out anything not yet persisted (at shutdown).
    fn flush(&self) -> StoreFuture<()>;

    /// Resolves once every change made before the call is as durable as
    /// this store makes anything. A response's last byte waits for it after
    /// its settlement, so a client that has a complete answer was charged
    /// for it even if the process dies next. SQLite writes what is pending
    /// (one transaction for every settlement waiting then: a group commit).
    /// Memory keeps nothing across a crash anyway; Redis has applied the
    /// settlement or is sending it again until answered, and until then
    /// holds the reservation, which a crash leaves charged: neither waits.
    fn persisted(&self) -> StoreFuture<()> {
        ready(Ok(()))
    }
}

/// The configured backend, opened: the budget store, and the same store as
/// routing's [`SharedHealth`] where it is shared by several instances.
pub struct Stores {
    pub budgets: Arc<dyn Store>,
    /// `None` for the in-process stores: they share nothing.
    pub health: Option<Arc<dyn SharedHealth>>,
}

impl Stores {
    /// Opens `backend` (loading an SQLite file and starting its background
    /// writer; not waiting for Redis, which may come up later).
    pub async fn open(backend: &StoreBackend) -> Result<Self, String> {
        Ok(match backend {
            StoreBackend::Memory => Self {
                budgets: Arc::new(MemoryStore::new()),
                health: None,
            },
            StoreBackend::Sqlite { path } => {
                let path = path.clone();
                let store = tokio::task::spawn_blocking(move || SqliteStore::open(&path))
                    .await
                    .map_err(|e| format!("store: {e}"))?
                    .map_err(|e| e.to_string())?;
                store.spawn_flusher(FLUSH_EVERY);
                Self {
                    budgets: store,
                    health: None,
                }
            }
            StoreBackend::Redis { url, options } => {
                let store = RedisStore::connect(url.expose(), options.clone())
                    .map_err(|e| e.to_string())?;
                // Start anyway: not ready until Redis answers, then serving
                // without a restart.
                if let Err(e) = store.health().await {
                    tracing::warn!("budget store: Redis does not answer yet: {e}");
                }
                Self {
                    budgets: Arc::clone(&store) as Arc<dyn Store>,
                    health: Some(store),
                }
            }
        })
    }
}

/// A future that is already done: the in-memory stores answer synchronously.
fn ready<T: Send + 'static>(value: Result<T, StoreError>) -> StoreFuture<T> {
    Box::pin(std::future::ready(value))
}

/// One suite for every store: `store_suite!(name, path::to::async_constructor)`;
/// the constructor returns the store and whatever must live as long as it (a
/// temporary directory, a Redis key prefix to delete), or `None` when the
/// store cannot run here: no Redis, said by the tests' one skip policy
/// (`tests/it/support/skip.rs`: `SKIPPED: <test>: <why>`, and a failure under
/// `IRIS_REQUIRE_REDIS=1`), after which the test returns.
#[cfg(test)]
macro_rules! store_suite {
    ($name:ident, $make:path) => {
        mod $name {
            use crate::budget::store::tests as suite;

            macro_rules! make {
                () => {
                    match $make().await {
                        Some(made) => made,
                        None => return,
                    }
                };
            }

            #[tokio::test]
            async fn reserve_is_all_or_nothing() {
                let (store, _guard) = make!();
                suite::reserve_is_all_or_nothing(store).await;
            }

            #[tokio::test]
            async fn settle_replaces_the_reservation() {
                let (store, _guard) = make!();
                suite::settle_replaces_the_reservation(store).await;
            }

            #[tokio::test]
            async fn release_keeps_only_the_request() {
                let (store, _guard) = make!();
                suite::release_keeps_only_the_request(store).await;
            }

            #[tokio::test]
            async fn clients_are_isolated() {
                let (store, _guard) = make!();
                suite::clients_are_isolated(store).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn concurrent_reservations_never_overspend() {
                let (store, _guard) = make!();
                suite::concurrent_reservations_never_overspend(store).await;
            }

            #[tokio::test]
            async fn health_and_flush_answer() {
                let (store, _guard) = make!();
                suite::health_and_flush_answer(store).await;
            }
        }
    };
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::budget::window::{NANOS_PER_SEC, Window};

    const NOW: u64 = 1_735_689_600 * NANOS_PER_SEC; // 2025-01-01T00:00:00Z

    fn limits() -> Limits {
        Limits {
            requests_per_minute: Some(100),
            tokens_per_minute: Some(1000),
            tokens_per_day: Some(1500),
            tokens_per_month: Some(10_000),
            max_concurrent: Some(3),
        }
    }

    fn account(client: &str) -> Account {
        Account::client(client)
    }

    fn used(snapshot: &Snapshot, window: Window) -> u64 {
        snapshot.get(window).used
    }

    pub async fn reserve_is_all_or_nothing(store: Arc<dyn Store>) {
        let limits = limits();
        let first = store
            .reserve(&account("c"), &limits, 900, NOW)
            .await
            .expect("store");
        let hold = first.outcome.expect("fits");
        assert_eq!(used(&first.snapshot, Window::TokensPerMinute), 900);
        assert_eq!(used(&first.snapshot, Window::RequestsPerMinute), 1);
        assert_eq!(used(&first.snapshot, Window::MaxConcurrent), 1);

        let second = store
            .reserve(&account("c"), &limits, 200, NOW)
            .await
            .expect("store");
        assert!(matches!(
            second.outcome,
            Err(Refusal::RateLimited {
                window: Window::TokensPerMinute,
                ..
            })
        ));
        assert_eq!(
            second.snapshot, first.snapshot,
            "a refused reservation changes no window"
        );
        store
            .settle(&account("c"), &limits, hold, 900, NOW)
            .await
            .expect("store");
    }

    pub async fn settle_replaces_the_reservation(store: Arc<dyn Store>) {
        let limits = limits();
        let hold = store
            .reserve(&account("c"), &limits, 800, NOW)
            .await
            .expect("store")
            .outcome
            .expect("fits");
        store
            .settle(&account("c"), &limits, hold, 120, NOW)
            .await
            .expect("store");
        let snapshot = store
            .snapshot(&account("c"), &limits, NOW)
            .await
            .expect("store");
        assert_eq!(used(&snapshot, Window::TokensPerMinute), 120);
        assert_eq!(used(&snapshot, Window::TokensPerDay), 120);
        assert_eq!(used(&snapshot, Window::TokensPerMonth), 120);
        assert_eq!(used(&snapshot, Window::MaxConcurrent), 0);
        assert_eq!(used(&snapshot, Window::RequestsPerMinute), 1);
    }

    pub async fn release_keeps_only_the_request(store: Arc<dyn Store>) {
        let limits = limits();
        let hold = store
            .reserve(&account("c"), &limits, 800, NOW)
            .await
            .expect("store")
            .outcome
            .expect("fits");
        store
            .settle(&account("c"), &limits, hold, 0, NOW)
            .await
            .expect("store");
        let snapshot = store
            .snapshot(&account("c"), &limits, NOW)
            .await
            .expect("store");
        assert_eq!(used(&snapshot, Window::TokensPerMinute), 0);
        assert_eq!(used(&snapshot, Window::TokensPerDay), 0);
        assert_eq!(used(&snapshot, Window::MaxConcurrent), 0);
        assert_eq!(used(&snapshot, Window::RequestsPerMinute), 1);
    }

    pub async fn clients_are_isolated(store: Arc<dyn Store>) {
        let limits = limits();
        let hold = store
            .reserve(&account("one"), &limits, 1000, NOW)
            .await
            .expect("store")
            .outcome
            .expect("fits");
        store
            .settle(&account("one"), &limits, hold, 1000, NOW)
            .await
            .expect("store");
        let other = store
            .reserve(&account("two"), &limits, 1000, NOW)
            .await
            .expect("store");
        assert!(
            other.outcome.is_ok(),
            "another client's budget is untouched"
        );
        let snapshot = store
            .snapshot(&account("three"), &limits, NOW)
            .await
            .expect("store");
        assert_eq!(used(&snapshot, Window::TokensPerDay), 0);
        let pacing = store
            .snapshot(&Account::upstream("one"), &limits, NOW)
            .await
            .expect("store");
        assert_eq!(
            used(&pacing, Window::TokensPerDay),
            0,
            "an upstream's pacing is not the client of the same name"
        );
    }

    pub async fn concurrent_reservations_never_overspend(store: Arc<dyn Store>) {
        let limits = Limits {
            tokens_per_day: Some(1000),
            ..Limits::default()
        };
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let store = Arc::clone(&store);
            tasks.push(tokio::spawn(async move {
                store
                    .reserve(&account("c"), &limits, 30, NOW)
                    .await
                    .expect("store")
                    .outcome
                    .is_ok()
            }));
        }
        let mut admitted = 0;
        for task in tasks {
            admitted += u64::from(task.await.expect("task"));
        }
        assert_eq!(admitted, 33, "1000 / 30 reservations fit, no more");
        let snapshot = store
            .snapshot(&account("c"), &limits, NOW)
            .await
            .expect("store");
        assert_eq!(used(&snapshot, Window::TokensPerDay), 990);
    }

    pub async fn health_and_flush_answer(store: Arc<dyn Store>) {
        store.health().await.expect("healthy");
        store.flush().await.expect("flushed");
    }

    async fn memory_store() -> Option<(Arc<dyn Store>, ())> {
        Some((Arc::new(MemoryStore::new()), ()))
    }

    async fn sqlite_store() -> Option<(Arc<dyn Store>, tempfile::TempDir)> {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("iris.db")).expect("open");
        Some((store, dir))
    }

    /// The Redis store on the test database, with the caller's clock so the
    /// suite's fixed dates mean the same as for the other stores.
    async fn redis_store() -> Option<(Arc<dyn Store>, super::redis::tests::SharedRedis)> {
        let (store, keys) = super::redis::tests::test_store(RedisClock::Caller).await?;
        Some((store, keys))
    }

    store_suite!(memory, super::memory_store);
    store_suite!(sqlite, super::sqlite_store);
    store_suite!(redis, super::redis_store);
}
