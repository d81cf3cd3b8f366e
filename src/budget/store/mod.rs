//! Where budget state lives, behind one small trait so the request path does
//! not care: [`MemoryStore`] (tests, throwaway runs), [`SqliteStore`] (the
//! embedded default: memory first, written to a file before a response's
//! last byte and every second) and
//! [`RedisStore`] (shared by several instances).
//!
//! Each operation is one call that a backend must perform atomically: a
//! `reserve` checks and charges every window of every [`Party`] together
//! (a client, and its team if it has one: all or nothing; the Redis store
//! does it in one Lua script), and `settle` corrects them in one step.
//! Time is passed in, so every backend and every test agrees on "now"
//! (the Redis store uses Redis's clock instead, shared by every instance).
//!
//! [`Stores::open`] opens the configured backend; the Redis store also
//! shares deployment health between instances, as a [`SharedHealth`], and
//! every store is where budget alerts are claimed ([`AlertClaims`]: the
//! memory store in the process, SQLite in its file, Redis with `SET NX`).

mod memory;
mod redis;
mod sqlite;
mod wal;

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
pub use sqlite::{FLUSH_EVERY, Load, Rider, SqliteStore, with_log};
pub use wal::{Frame, Item as LogItem, insert_sql};

use super::window::{Charge, Hold, Refusal, Snapshot};
use super::{Account, StoreBackend};
use crate::alerts::AlertClaims;
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

/// One account a reservation counts against, with its limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Party {
    pub account: Account,
    pub limits: Limits,
}

/// The parties of one reservation: one account, or a client and its team.
pub type Parties = Arc<[Party]>;

impl Party {
    /// A reservation's parties when it is `account`'s alone.
    pub fn alone(account: Account, limits: Limits) -> Parties {
        Arc::new([Party { account, limits }])
    }
}

/// Which party refused a reservation, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// Its index among the reservation's parties.
    pub party: usize,
    pub refusal: Refusal,
}

/// The result of a reservation, with each party's windows as they stand
/// after it (the first's for the `x-ratelimit-*` headers).
#[derive(Debug, Clone)]
pub struct Reserved {
    pub outcome: Result<Hold, Refused>,
    /// One per party, in their order.
    pub snapshots: Vec<Snapshot>,
}

/// The refusal to report when several parties refuse: the one the client
/// must wait longest for (see [`Refusal::severity`]); the first party's on
/// a tie.
pub(crate) fn worst(refusals: impl IntoIterator<Item = Refused>) -> Option<Refused> {
    refusals
        .into_iter()
        .fold(None, |worst: Option<Refused>, r| match worst {
            Some(w) if w.refusal.severity() >= r.refusal.severity() => Some(w),
            _ => Some(r),
        })
}

pub trait Store: Send + Sync + 'static {
    /// Atomically reserves `charge`, one request and one concurrency slot
    /// against every window of every party, or reserves nothing anywhere
    /// and says why.
    fn reserve(&self, parties: &Parties, charge: Charge, now: u64) -> StoreFuture<Reserved>;

    /// Replaces what `hold` reserved from each party by `actual` and frees
    /// its slots. With nothing `actual`, it gives back everything but the
    /// request it counted (the upstream failed, or Iris refused the request
    /// after reserving).
    fn settle(&self, parties: &Parties, hold: Hold, actual: Charge, now: u64) -> StoreFuture<()>;

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

/// The configured backend, opened: the budget store, the same store as
/// routing's [`SharedHealth`] where it is shared by several instances, and
/// as where budget alerts are claimed.
pub struct Stores {
    pub budgets: Arc<dyn Store>,
    pub claims: Arc<dyn AlertClaims>,
    /// `None` for the in-process stores: they share nothing.
    pub health: Option<Arc<dyn SharedHealth>>,
    /// The SQLite store, whose transactions the spend log's records ride in.
    pub sqlite: Option<Arc<SqliteStore>>,
    /// The Redis store's connection, for the response cache to share.
    pub redis: Option<RedisConnection>,
}

impl Stores {
    /// Opens `backend` (loading an SQLite file and starting its background
    /// writer; not waiting for Redis, which may come up later).
    pub async fn open(backend: &StoreBackend) -> Result<Self, String> {
        Ok(match backend {
            StoreBackend::Memory => {
                let store = Arc::new(MemoryStore::new());
                Self {
                    budgets: Arc::clone(&store) as Arc<dyn Store>,
                    claims: store,
                    health: None,
                    sqlite: None,
                    redis: None,
                }
            }
            StoreBackend::Sqlite { path } => {
                let path = path.clone();
                let store = tokio::task::spawn_blocking(move || SqliteStore::open(&path))
                    .await
                    .map_err(|e| format!("store: {e}"))?
                    .map_err(|e| e.to_string())?;
                store.spawn_flusher(FLUSH_EVERY);
                Self {
                    budgets: Arc::clone(&store) as Arc<dyn Store>,
                    claims: Arc::clone(&store) as Arc<dyn AlertClaims>,
                    health: None,
                    sqlite: Some(store),
                    redis: None,
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
                    claims: Arc::clone(&store) as Arc<dyn AlertClaims>,
                    redis: Some(store.connection().clone()),
                    health: Some(store),
                    sqlite: None,
                }
            }
        })
    }
}

/// A future that is already done: the in-memory stores answer synchronously.
fn ready<T: Send + 'static>(value: Result<T, StoreError>) -> StoreFuture<T> {
    Box::pin(std::future::ready(value))
}

/// One account's reservation, as most tests make them.
#[cfg(test)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReservedOne {
    pub outcome: Result<Hold, Refusal>,
    pub snapshot: Snapshot,
}

/// Tests' shorthand for a reservation of one account, in tokens.
#[cfg(test)]
pub(crate) trait OneAccount {
    fn reserve_one(
        &self,
        account: &Account,
        limits: &Limits,
        tokens: u64,
        now: u64,
    ) -> StoreFuture<ReservedOne>;
    fn settle_one(
        &self,
        account: &Account,
        limits: &Limits,
        hold: Hold,
        tokens: u64,
        now: u64,
    ) -> StoreFuture<()>;
}

#[cfg(test)]
impl<S: Store + ?Sized> OneAccount for S {
    fn reserve_one(
        &self,
        account: &Account,
        limits: &Limits,
        tokens: u64,
        now: u64,
    ) -> StoreFuture<ReservedOne> {
        let reserved = self.reserve(
            &Party::alone(account.clone(), *limits),
            Charge::tokens(tokens),
            now,
        );
        Box::pin(async move {
            let Reserved { outcome, snapshots } = reserved.await?;
            Ok(ReservedOne {
                outcome: outcome.map_err(|refused| refused.refusal),
                snapshot: snapshots[0],
            })
        })
    }

    fn settle_one(
        &self,
        account: &Account,
        limits: &Limits,
        hold: Hold,
        tokens: u64,
        now: u64,
    ) -> StoreFuture<()> {
        self.settle(
            &Party::alone(account.clone(), *limits),
            hold,
            Charge::tokens(tokens),
            now,
        )
    }
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
            store_case!($make, reserve_is_all_or_nothing);
            store_case!($make, settle_replaces_the_reservation);
            store_case!($make, release_keeps_only_the_request);
            store_case!($make, clients_are_isolated);
            store_case!($make, concurrent_reservations_never_overspend, multi_thread);
            store_case!($make, money_first_charged_at_settlement_is_counted);
            store_case!($make, a_team_reservation_is_all_or_nothing);
            store_case!(
                $make,
                concurrent_team_reservations_never_overspend,
                multi_thread
            );
            store_case!($make, health_and_flush_answer);
        }
    };
}

/// One test of [`store_suite!`]: the suite's function of that name on the
/// store `$make` opens (on a 4-thread runtime with `multi_thread`).
#[cfg(test)]
macro_rules! store_case {
    ($make:path, $test:ident) => {
        store_case!($make, $test, #[tokio::test]);
    };
    ($make:path, $test:ident, multi_thread) => {
        store_case!(
            $make,
            $test,
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        );
    };
    ($make:path, $test:ident, #[$runtime:meta]) => {
        #[$runtime]
        async fn $test() {
            let Some((store, _guard)) = $make().await else {
                return;
            };
            crate::budget::store::tests::$test(store).await;
        }
    };
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::budget::money::Money;
    use crate::budget::store::OneAccount;
    use crate::budget::window::{NANOS_PER_SEC, Window};

    const NOW: u64 = 1_735_689_600 * NANOS_PER_SEC; // 2025-01-01T00:00:00Z

    fn limits() -> Limits {
        Limits {
            requests_per_minute: Some(100),
            tokens_per_minute: Some(1000),
            tokens_per_day: Some(1500),
            tokens_per_month: Some(10_000),
            max_concurrent: Some(3),
            ..Limits::default()
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
            .reserve_one(&account("c"), &limits, 900, NOW)
            .await
            .expect("store");
        let hold = first.outcome.expect("fits");
        assert_eq!(used(&first.snapshot, Window::TokensPerMinute), 900);
        assert_eq!(used(&first.snapshot, Window::RequestsPerMinute), 1);
        assert_eq!(used(&first.snapshot, Window::MaxConcurrent), 1);

        let second = store
            .reserve_one(&account("c"), &limits, 200, NOW)
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
            .settle_one(&account("c"), &limits, hold, 900, NOW)
            .await
            .expect("store");
    }

    pub async fn settle_replaces_the_reservation(store: Arc<dyn Store>) {
        let limits = limits();
        let hold = store
            .reserve_one(&account("c"), &limits, 800, NOW)
            .await
            .expect("store")
            .outcome
            .expect("fits");
        store
            .settle_one(&account("c"), &limits, hold, 120, NOW)
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
            .reserve_one(&account("c"), &limits, 800, NOW)
            .await
            .expect("store")
            .outcome
            .expect("fits");
        store
            .settle_one(&account("c"), &limits, hold, 0, NOW)
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
            .reserve_one(&account("one"), &limits, 1000, NOW)
            .await
            .expect("store")
            .outcome
            .expect("fits");
        store
            .settle_one(&account("one"), &limits, hold, 1000, NOW)
            .await
            .expect("store");
        let other = store
            .reserve_one(&account("two"), &limits, 1000, NOW)
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
                    .reserve_one(&account("c"), &limits, 30, NOW)
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

    /// A client of `team` and the team's parties, with `limits` for the
    /// client and `team_limits` for the team.
    fn member_of(client: &str, team: &str, limits: Limits, team_limits: Limits) -> Parties {
        let team = Account::team(team);
        Arc::new([
            Party {
                account: Account::member(client, &team),
                limits,
            },
            Party {
                account: team,
                limits: team_limits,
            },
        ])
    }

    fn money(micros: u64) -> Money {
        Money::from_micros(micros)
    }

    /// A reservation that held no money (its estimate priced at nothing)
    /// settled at a cost: the day and month count it (the Redis store
    /// writes no money key for a reservation without money).
    pub async fn money_first_charged_at_settlement_is_counted(store: Arc<dyn Store>) {
        let limits = Limits {
            cost_per_day: Some(money(10_000)),
            cost_per_month: Some(money(10_000)),
            ..Limits::default()
        };
        let parties = Party::alone(account("c"), limits);
        let hold = store
            .reserve(&parties, Charge::tokens(10), NOW)
            .await
            .expect("store")
            .outcome
            .expect("fits");
        let actual = Charge {
            tokens: 10,
            cost: money(500),
        };
        store
            .settle(&parties, hold, actual, NOW)
            .await
            .expect("store");
        let now = store
            .snapshot(&account("c"), &limits, NOW)
            .await
            .expect("store");
        assert_eq!(used(&now, Window::CostPerDay), 500);
        assert_eq!(used(&now, Window::CostPerMonth), 500);
        // And the next reservation adds to it.
        let next = store
            .reserve(
                &parties,
                Charge {
                    tokens: 10,
                    cost: money(100),
                },
                NOW,
            )
            .await
            .expect("store");
        assert_eq!(used(&next.snapshots[0], Window::CostPerDay), 600);
    }

    pub async fn a_team_reservation_is_all_or_nothing(store: Arc<dyn Store>) {
        let roomy = Limits {
            cost_per_day: Some(money(1_000)),
            ..Limits::default()
        };
        let team = Limits {
            cost_per_month: Some(money(500)),
            ..Limits::default()
        };
        let alice = member_of("alice", "t", roomy, team);
        let bob = member_of("bob", "t", roomy, team);
        let charge = |micros| Charge {
            tokens: 10,
            cost: money(micros),
        };
        let first = store
            .reserve(&alice, charge(300), NOW)
            .await
            .expect("store");
        let hold = first.outcome.expect("fits both");
        assert_eq!(used(&first.snapshots[0], Window::CostPerDay), 300);
        assert_eq!(used(&first.snapshots[1], Window::CostPerMonth), 300);

        // The team has 200 left: bob's 300 is refused by the team, and
        // nothing is reserved on bob's own windows either.
        let refused = store.reserve(&bob, charge(300), NOW).await.expect("store");
        let Err(Refused { party, refusal }) = refused.outcome else {
            panic!("the team's budget refuses: {:?}", refused.outcome);
        };
        assert_eq!((party, refusal.window()), (1, Window::CostPerMonth));
        let bob_now = store
            .snapshot(&bob[0].account, &roomy, NOW)
            .await
            .expect("store");
        assert_eq!(used(&bob_now, Window::CostPerDay), 0);
        assert_eq!(used(&bob_now, Window::TokensPerDay), 0);
        assert_eq!(used(&bob_now, Window::MaxConcurrent), 0);

        // Alice's request costs less than reserved: the team gets it back.
        store
            .settle(&alice, hold, charge(100), NOW)
            .await
            .expect("store");
        let team_now = store
            .snapshot(&alice[1].account, &team, NOW)
            .await
            .expect("store");
        assert_eq!(used(&team_now, Window::CostPerMonth), 100);
        assert_eq!(used(&team_now, Window::MaxConcurrent), 0);
        let admitted = store.reserve(&bob, charge(300), NOW).await.expect("store");
        assert!(admitted.outcome.is_ok(), "{:?}", admitted.outcome);
        let other_team = member_of("carol", "u", roomy, team);
        let elsewhere = store
            .reserve(&other_team, charge(500), NOW)
            .await
            .expect("store");
        assert!(
            elsewhere.outcome.is_ok(),
            "another team's budget is its own: {:?}",
            elsewhere.outcome
        );
    }

    /// Many members of one team at once: the team's budget admits what it
    /// fits, no more, and each member's windows count only what it was let do.
    pub async fn concurrent_team_reservations_never_overspend(store: Arc<dyn Store>) {
        let team = Limits {
            cost_per_day: Some(money(1_000)),
            ..Limits::default()
        };
        let mut tasks = Vec::new();
        for i in 0..64 {
            let parties = member_of(&format!("m{}", i % 8), "t", Limits::default(), team);
            let store = Arc::clone(&store);
            tasks.push(tokio::spawn(async move {
                let charge = Charge {
                    tokens: 1,
                    cost: money(30),
                };
                store
                    .reserve(&parties, charge, NOW)
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
        assert_eq!(admitted, 33, "1000 / 30 reservations fit the team, no more");
        let team_now = store
            .snapshot(&Account::team("t"), &team, NOW)
            .await
            .expect("store");
        assert_eq!(used(&team_now, Window::CostPerDay), 990);
        let mut members = 0;
        for i in 0..8 {
            let member = Account::member(format!("m{i}"), &Account::team("t"));
            let now = store
                .snapshot(&member, &Limits::default(), NOW)
                .await
                .expect("store");
            members += used(&now, Window::TokensPerDay);
        }
        assert_eq!(
            members, 33,
            "members were charged exactly what was admitted"
        );
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
