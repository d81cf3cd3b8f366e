//! The Redis store against a real Redis: its own database on the local
//! server, every test under its own random key prefix, deleted afterwards, so
//! tests run in parallel and never touch anyone else's keys. Without Redis the
//! tests say they were skipped and pass, unless `IRIS_REQUIRE_REDIS=1` (CI).
//!
//! The URL, the key cleanup and the skip policy are the integration tests'
//! own harness, included here so that they are written once.

use std::collections::HashSet;

use super::*;
use crate::alerts::AlertClaims;
use crate::budget::money::Money;
use crate::budget::store::{MemoryStore, OneAccount, Parties, Party, ReservedOne};
use crate::budget::window::Charge;
use crate::budget::window::{MINUTE, NANOS_PER_SEC};
use redis::Script;

#[path = "../../../../tests/it/support/skip.rs"]
mod skip;
/// The one skip policy, for the spend log's PostgreSQL tests too (a file
/// may be a module only once).
pub(crate) use self::skip::skip;

/// The one Redis harness of Iris's tests (`tests/it/support/redis.rs`).
#[path = "../../../../tests/it/support/redis.rs"]
pub(crate) mod harness;
pub(crate) use self::harness::SharedRedis;

/// Ports for the servers it starts (`tests/it/support/ports.rs`).
#[path = "../../../../tests/it/support/ports.rs"]
mod ports;

/// Its private Cluster (`tests/it/support/redis_cluster.rs`).
#[path = "../../../../tests/it/support/redis_cluster.rs"]
mod cluster;

const SEC: u64 = NANOS_PER_SEC;

pub(crate) fn test_options(prefix: &str, clock: RedisClock) -> RedisOptions {
    RedisOptions {
        prefix: prefix.to_owned(),
        lease: Duration::from_secs(600),
        // Generous: the test machine is shared and busy.
        timeout: Duration::from_secs(2),
        clock,
    }
}

/// A store on the test database under the test's own prefix (deleted when
/// the [`SharedRedis`] drops), or `None` after [`skip`] without Redis.
pub(crate) async fn test_store(clock: RedisClock) -> Option<(Arc<RedisStore>, SharedRedis)> {
    test_store_with(clock, |_| {}).await
}

/// [`test_store`] with `adjust` applied to its options.
pub(crate) async fn test_store_with(
    clock: RedisClock,
    adjust: impl FnOnce(&mut RedisOptions),
) -> Option<(Arc<RedisStore>, SharedRedis)> {
    let redis = SharedRedis::get().await?;
    let mut options = test_options(&redis.prefix, clock);
    adjust(&mut options);
    let store = RedisStore::connect(&redis.url, options).expect("store");
    Some((store, redis))
}

/// Unix nanoseconds of a UTC date and time.
fn at(year: i16, month: i8, day: i8, hms: (i8, i8, i8)) -> u64 {
    let civil = jiff::civil::datetime(year, month, day, hms.0, hms.1, hms.2, 0);
    let secs = jiff::tz::Offset::UTC
        .to_timestamp(civil)
        .expect("in range")
        .as_second();
    u64::try_from(secs).expect("after 1970") * SEC
}

/// The client most tests use.
fn c() -> Account {
    Account::client("c")
}

async fn reserve(store: &RedisStore, limits: &Limits, tokens: u64, now: u64) -> ReservedOne {
    store
        .reserve_one(&c(), limits, tokens, now)
        .await
        .expect("store")
}

async fn snapshot(store: &RedisStore, limits: &Limits, now: u64) -> Snapshot {
    store.snapshot(&c(), limits, now).await.expect("store")
}

#[tokio::test]
async fn lua_calendar_matches_window_rs_at_every_boundary() {
    let Some((store, _keys)) = test_store(RedisClock::Caller).await else {
        return;
    };
    let mut instants = Vec::new();
    for year in 1999..=2101 {
        for month in 1..=12 {
            let start = at(year, month, 1, (0, 0, 0)) / 1000;
            instants.extend([
                start - 1,
                start,
                start + 1,
                start + 14 * 86_400_000_000 + 12_345,
            ]);
        }
    }
    // Every midnight of a leap year, and a microsecond before it.
    for day in 0..367 {
        let midnight = at(2024, 1, 1, (0, 0, 0)) / 1000 + day * 86_400_000_000;
        instants.extend([midnight - 1, midnight]);
    }
    let probe = Script::new(&format!(
        "{COMMON}\nlocal out = {{}}\n\
         for i = 1, #ARGV do\n\
           local d, de, m, me = periods(tonumber(ARGV[i]))\n\
           out[#out + 1] = d; out[#out + 1] = de; out[#out + 1] = m; out[#out + 1] = me\n\
         end\n\
         return out"
    ));
    let mut invocation = probe.prepare_invoke();
    for instant in &instants {
        invocation.arg(*instant);
    }
    let mut connection = store.connection.clone();
    let reply: Vec<i64> = invocation
        .invoke_async(&mut connection)
        .await
        .expect("script");
    assert_eq!(reply.len(), instants.len() * 4);
    for (instant, lua) in instants.iter().zip(reply.chunks_exact(4)) {
        let rust = Periods::at(instant * 1000);
        assert_eq!(
            (
                to_u32(lua[0]),
                to_u64(lua[1]) * 1000,
                to_u32(lua[2]),
                to_u64(lua[3]) * 1000
            ),
            (rust.day, rust.day_end, rust.month, rust.month_end),
            "at {} ({instant} us)",
            crate::budget::window::format_utc(instant * 1000)
        );
    }
}

/// The same operations on Redis and on the memory store give the same
/// answers: the Lua port of the windows is the arithmetic of `window.rs`,
/// for a team client's reservations (two parties, tokens and money).
#[tokio::test]
async fn redis_and_memory_agree_step_by_step() {
    let Some((store, _keys)) = test_store(RedisClock::Caller).await else {
        return;
    };
    let memory = MemoryStore::new();
    let limits = Limits {
        requests_per_minute: Some(6),
        tokens_per_minute: Some(1000),
        tokens_per_day: Some(12_000),
        tokens_per_month: None,
        max_concurrent: Some(3),
        cost_per_day: Some(Money::from_micros(150_000)),
        cost_per_month: None,
    };
    // The team's concurrency and money per month are narrower.
    let team_limits = Limits {
        requests_per_minute: Some(20),
        max_concurrent: Some(2),
        cost_per_month: Some(Money::from_micros(200_000)),
        ..Limits::default()
    };
    let team = Account::team("t");
    let parties: Parties = Arc::new([
        Party {
            account: Account::member("c", &team),
            limits,
        },
        Party {
            account: team,
            limits: team_limits,
        },
    ]);
    // Money: 13 micro-units a token, so the cost windows refuse too.
    let charge = |tokens: u64| Charge {
        tokens,
        cost: Money::from_micros(tokens * 13),
    };
    // Across midnight into February 29th: a new day in the same month.
    let mut now = at(2024, 2, 28, (23, 45, 0));
    let mut held: Vec<(Hold, Hold)> = Vec::new();
    let mut seen = HashSet::new();
    // A fixed pseudo-random walk: bursts, pauses, early and late settles.
    let mut random = 0x2545_f491_u64;
    let mut next = |n: u64| {
        random = splitmix64(random);
        random % n
    };
    for step in 0..600 {
        let tokens = [10, 40, 120, 250, 333, 600, 1000, 1200][next(8) as usize];
        let on_redis = store
            .reserve(&parties, charge(tokens), now)
            .await
            .expect("store");
        let in_memory = memory.reserve_now(&parties, charge(tokens), now);
        let context = format!(
            "step {step}, {tokens} tokens at {}",
            crate::budget::window::format_utc(now)
        );
        match (on_redis.outcome, in_memory.outcome) {
            (Ok(r), Ok(m)) => {
                assert_eq!(
                    (r.tokens, r.cost, r.day, r.month),
                    (m.tokens, m.cost, m.day, m.month),
                    "{context}"
                );
                held.push((r, m));
            }
            (Err(r), Err(m)) => {
                assert_eq!(
                    (r.party, r.refusal.window()),
                    (m.party, m.refusal.window()),
                    "{context}"
                );
                seen.insert((r.party, r.refusal.window()));
                match (r.refusal, m.refusal) {
                    (
                        Refusal::RateLimited { wait: a, .. },
                        Refusal::RateLimited { wait: b, .. },
                    ) => assert!(a.abs_diff(b) <= 1000, "{context}: waits {a} and {b}"),
                    (r, m) => assert_eq!(r, m, "{context}"),
                }
            }
            (r, m) => panic!("{context}: redis {r:?}, memory {m:?}"),
        }
        for (r, m) in on_redis.snapshots.iter().zip(&in_memory.snapshots) {
            for (r, m) in r.windows.iter().zip(m.windows) {
                assert_eq!(
                    (r.limit, r.used),
                    (m.limit, m.used),
                    "{context}: {:?}",
                    r.window
                );
            }
        }
        // Settle a random hold, at between nothing and 1.5 times its estimate.
        if !held.is_empty() && next(3) > 0 {
            let (r, m) = held.remove(next(held.len() as u64) as usize);
            let actual = charge(r.tokens * next(4) / 2);
            store
                .settle(&parties, r, actual, now)
                .await
                .expect("settle");
            memory.settle_now(&parties, &m, actual, now);
        }
        now += [0, 0, 0, 1, 3, 10, 20][next(7) as usize] * SEC + next(1000) * 1000;
    }
    assert_eq!(
        seen,
        HashSet::from([
            (0, Window::RequestsPerMinute),
            (0, Window::TokensPerMinute),
            (0, Window::TokensPerDay),
            (0, Window::CostPerDay),
            (1, Window::MaxConcurrent),
            (1, Window::CostPerMonth),
        ]),
        "the sequence meets every kind of refusal, the team's too"
    );
    for party in parties.iter() {
        let r = store
            .snapshot(&party.account, &party.limits, now)
            .await
            .expect("store");
        let m = memory.snapshot_now(&party.account, &party.limits, now);
        for (r, m) in r.windows.iter().zip(m.windows) {
            assert_eq!((r.used, r.limit), (m.used, m.limit), "{:?}", r.window);
        }
    }
}

#[tokio::test]
async fn calendar_windows_roll_at_utc_midnight_and_settle_the_day_of_admission() {
    let Some((store, _keys)) = test_store(RedisClock::Caller).await else {
        return;
    };
    let limits = Limits {
        tokens_per_day: Some(1000),
        tokens_per_month: Some(1500),
        ..Limits::default()
    };
    let eve = at(2024, 12, 31, (23, 59, 59)) + 999_999_000;
    let hold = reserve(&store, &limits, 900, eve)
        .await
        .outcome
        .expect("fits");
    let refused = reserve(&store, &limits, 200, eve).await;
    assert_eq!(
        refused.outcome,
        Err(Refusal::Exhausted {
            window: Window::TokensPerDay,
            reset_at: at(2025, 1, 1, (0, 0, 0)),
        })
    );
    let new_year = at(2025, 1, 1, (0, 0, 0));
    let next = reserve(&store, &limits, 200, new_year).await;
    let next_hold = next.outcome.expect("a new day and a new month");
    assert_eq!(next_hold.day, hold.day + 1);
    assert_eq!(next_hold.month, hold.month + 1);
    assert_eq!(next.snapshot.get(Window::TokensPerDay).used, 200);
    assert_eq!(next.snapshot.get(Window::TokensPerMonth).used, 200);
    // Settling last year's request corrects last year, not this one.
    store
        .settle_one(&c(), &limits, hold, 10, new_year)
        .await
        .expect("settle");
    let now = snapshot(&store, &limits, new_year).await;
    assert_eq!(now.get(Window::TokensPerDay).used, 200);
    assert_eq!(now.get(Window::MaxConcurrent).used, 1);
}

#[tokio::test]
async fn redis_time_is_the_clock_not_the_callers() {
    let Some((store, _keys)) = test_store(RedisClock::Server).await else {
        return;
    };
    let limits = Limits {
        tokens_per_day: Some(1000),
        ..Limits::default()
    };
    let system = crate::budget::window::Clock::system().now();
    // A caller whose clock says 1970: ignored.
    let reserved = reserve(&store, &limits, 10, 0).await;
    let hold = reserved.outcome.expect("fits");
    assert!(
        reserved.snapshot.now.abs_diff(system) < 5 * SEC,
        "Redis's now {} vs system {system}",
        reserved.snapshot.now
    );
    assert_eq!(hold.day, Periods::at(reserved.snapshot.now).day);
    assert_eq!(
        snapshot(&store, &limits, 0)
            .await
            .get(Window::TokensPerDay)
            .used,
        10
    );
}

#[tokio::test]
async fn an_expired_lease_frees_its_slot_and_a_late_settle_corrects_the_tokens_once() {
    let Some((store, _keys)) = test_store_with(RedisClock::Caller, |options| {
        options.lease = Duration::from_secs(10);
    })
    .await
    else {
        return;
    };
    let limits = Limits {
        tokens_per_day: Some(1000),
        max_concurrent: Some(1),
        ..Limits::default()
    };
    let t0 = at(2025, 3, 3, (3, 3, 3));
    let stuck = reserve(&store, &limits, 600, t0)
        .await
        .outcome
        .expect("fits");
    let refused = reserve(&store, &limits, 10, t0 + 10 * SEC - 1000).await;
    assert!(matches!(
        refused.outcome,
        Err(Refusal::RateLimited {
            window: Window::MaxConcurrent,
            ..
        })
    ));
    // Its instance died: nobody settles. At the lease's end the slot is free;
    // the 600 tokens stay charged.
    let after = reserve(&store, &limits, 300, t0 + 10 * SEC).await;
    let live = after.outcome.expect("the stuck lease expired");
    assert_eq!(after.snapshot.get(Window::MaxConcurrent).used, 1);
    assert_eq!(after.snapshot.get(Window::TokensPerDay).used, 900);

    // The stuck request settles after all, late: its tokens are corrected
    // once, and the live reservation keeps its slot.
    store
        .settle_one(&c(), &limits, stuck, 100, t0 + 11 * SEC)
        .await
        .expect("settle");
    let now = snapshot(&store, &limits, t0 + 11 * SEC).await;
    assert_eq!(now.get(Window::TokensPerDay).used, 400);
    assert_eq!(now.get(Window::MaxConcurrent).used, 1);
    assert!(
        reserve(&store, &limits, 1, t0 + 11 * SEC)
            .await
            .outcome
            .is_err(),
        "the live reservation still holds the only slot"
    );
    store
        .settle_one(&c(), &limits, live, 300, t0 + 12 * SEC)
        .await
        .expect("settle");
    let now = snapshot(&store, &limits, t0 + 12 * SEC).await;
    assert_eq!(now.get(Window::TokensPerDay).used, 400);
    assert_eq!(now.get(Window::MaxConcurrent).used, 0);

    // Settlements are idempotent: sent again (their first answer lost in a
    // failover), they change nothing, whether the lease was live or expired.
    store
        .settle_one(&c(), &limits, live, 50, t0 + 13 * SEC)
        .await
        .expect("settle again");
    store
        .settle_one(&c(), &limits, stuck, 0, t0 + 13 * SEC)
        .await
        .expect("late settle again");
    let now = snapshot(&store, &limits, t0 + 13 * SEC).await;
    assert_eq!(now.get(Window::TokensPerDay).used, 400);
    assert_eq!(now.get(Window::MaxConcurrent).used, 0);
}

#[tokio::test]
async fn every_key_expires_after_its_window() {
    let Some((store, keys)) = test_store(RedisClock::Server).await else {
        return;
    };
    let limits = Limits {
        requests_per_minute: Some(60),
        tokens_per_minute: Some(6000),
        ..Limits::default()
    };
    let hold = reserve(&store, &limits, 100, 0)
        .await
        .outcome
        .expect("fits");
    let mut connection = store.connection.clone();
    let mut ttl = async |suffix: &str| -> i64 {
        redis::cmd("PTTL")
            .arg(format!("{}:v1:{{c}}:{suffix}", keys.prefix))
            .query_async(&mut connection)
            .await
            .expect("pttl")
    };
    // One request of 60 per minute and 100 tokens of 6000 both drain in a
    // second; the keys live that long plus a second's margin.
    for bucket in ["rpm", "tpm"] {
        let left = ttl(bucket).await;
        assert!((1000..=2000).contains(&left), "{bucket}: {left} ms");
    }
    let now = crate::budget::window::Clock::system().now();
    let periods = Periods::at(now);
    let hour = 3_600_000;
    for (calendar, end) in [("day", periods.day_end), ("month", periods.month_end)] {
        let left = ttl(calendar).await;
        let until_end = i64::try_from((end - now) / 1_000_000).expect("ms");
        assert!(
            (until_end + hour - 5000..=until_end + hour + 5000).contains(&left),
            "{calendar}: {left} ms, its period ends in {until_end} ms"
        );
    }
    let leases = ttl("leases").await;
    assert!((599_000..=601_000).contains(&leases), "leases: {leases} ms");

    // Given back entirely, the token bucket is empty and needs no key, and
    // no lease is left.
    store
        .settle_one(&c(), &limits, hold, 0, 0)
        .await
        .expect("settle");
    assert_eq!(ttl("tpm").await, -2);
    assert_eq!(ttl("leases").await, -2);
    let remaining: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*", keys.prefix))
        .query_async(&mut connection)
        .await
        .expect("keys");
    for key in remaining {
        let left: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut connection)
            .await
            .expect("pttl");
        assert!(left > 0, "{key} never expires");
    }
}

/// The keys of every kind of account are what they were before accounts
/// were typed: running instances and existing data keep working.
#[test]
fn account_keys_keep_their_layout() {
    let keys = AccountKeys::new("iris", &Account::client("b"));
    assert_eq!(keys.rpm, "iris:v1:{b}:rpm");
    assert_eq!(keys.expired, "iris:v1:{b}:expired");
    let keys = AccountKeys::new("iris", &Account::upstream("openai"));
    assert_eq!(keys.tpm, "iris:v1:{%01upstream%2Fopenai}:tpm");
    assert_eq!(keys.leases, "iris:v1:{%01upstream%2Fopenai}:leases");
}

#[test]
fn client_names_cannot_break_the_hash_tag() {
    assert_eq!(encode("team-a_1.x~"), "team-a_1.x~");
    assert_eq!(encode("a{b}:c d%"), "a%7Bb%7D%3Ac%20d%25");
    assert_eq!(encode("é"), "%C3%A9");
    assert_ne!(encode("a{b}"), encode("a%7Bb%7D"), "% is encoded too");

    let prefix = "iris";
    let keys = AccountKeys::new(prefix, &Account::client("x}{y"));
    for key in [&keys.rpm, &keys.tpm, &keys.day, &keys.month, &keys.leases] {
        // Redis Cluster hashes the text between the first `{` and the next `}`.
        let open = key.find('{').expect("{");
        let close = open + key[open..].find('}').expect("}");
        assert_eq!(&key[open + 1..close], "x%7D%7By", "{key}");
        assert!(
            key.starts_with(&format!("{prefix}:{LAYOUT}:{{")),
            "the layout version is in every key: {key}"
        );
    }
}

#[tokio::test]
async fn an_alert_is_claimed_once_under_the_prefix_until_its_period_ends() {
    let Some((store, redis)) = test_store(RedisClock::Server).await else {
        return;
    };
    let other = RedisStore::connect(&redis.url, test_options(&redis.prefix, RedisClock::Server))
        .expect("a second instance's store");
    let ttl = Duration::from_secs(7200);
    assert_eq!(store.claim("[\"client\",\"c\"]", ttl).await, Ok(true));
    assert_eq!(
        other.claim("[\"client\",\"c\"]", ttl).await,
        Ok(false),
        "another instance finds it claimed"
    );
    assert_eq!(store.claim("[\"team\",\"c\"]", ttl).await, Ok(true));
    let mut connection = store.connection.clone();
    let key = format!("{}:v1:{{alert/%5B%22client%22%2C%22c%22%5D}}", redis.prefix);
    let pttl: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut connection)
        .await
        .expect("PTTL");
    assert!(pttl > 7_000_000 && pttl <= 7_200_000, "{key}: {pttl}");
}

#[tokio::test]
async fn another_layouts_keys_are_never_read() {
    let Some((store, keys)) = test_store(RedisClock::Server).await else {
        return;
    };
    let mut connection = store.connection.clone();
    // Another layout keeps a string where v1 keeps a hash: read as v1 it
    // would fail with WRONGTYPE.
    for version in ["v0", "v2"] {
        for suffix in ["day", "leases"] {
            let _: () = redis::cmd("SET")
                .arg(format!("{}:{version}:{{c}}:{suffix}", keys.prefix))
                .arg("something else")
                .arg("EX")
                .arg(60)
                .query_async(&mut connection)
                .await
                .expect("set");
        }
    }
    let limits = Limits {
        tokens_per_day: Some(100),
        ..Limits::default()
    };
    let reserved = reserve(&store, &limits, 10, 0).await;
    assert!(reserved.outcome.is_ok());
    assert_eq!(reserved.snapshot.get(Window::TokensPerDay).used, 10);
}

#[tokio::test]
async fn flush_waits_for_settlements_on_their_way() {
    let Some((store, _keys)) = test_store(RedisClock::Server).await else {
        return;
    };
    let limits = Limits::default();
    let hold = reserve(&store, &limits, 100, 0)
        .await
        .outcome
        .expect("fits");
    // A settlement made (from a reservation's Drop) but not yet run.
    let settlement = store.settle_one(&c(), &limits, hold, 40, 0);
    let flush = tokio::spawn(store.flush());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!flush.is_finished(), "flush waits for the settlement");
    settlement.await.expect("settle");
    flush.await.expect("task").expect("flushed");
    let now = snapshot(&store, &limits, 0).await;
    assert_eq!(now.get(Window::TokensPerDay).used, 40);

    // Nothing pending: at once. A settlement dropped unrun is not waited for.
    drop(store.settle_one(&c(), &limits, hold, 40, 0));
    tokio::time::timeout(Duration::from_millis(100), store.flush())
        .await
        .expect("immediate")
        .expect("flushed");
}

/// A listener that accepts connections and never answers.
async fn silent_server() -> (tokio::net::TcpListener, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("redis://{}/0", listener.local_addr().expect("addr"));
    (listener, url)
}

#[tokio::test]
async fn a_redis_that_does_not_answer_fails_within_the_timeout() {
    let (_silent, url) = silent_server().await;
    let mut options = test_options("iris-test", RedisClock::Server);
    options.timeout = Duration::from_millis(300);
    let store = RedisStore::connect(&url, options.clone()).expect("store");
    let limits = Limits::default();
    for _ in 0..2 {
        let started = std::time::Instant::now();
        let error = store
            .reserve_one(&c(), &limits, 1, 0)
            .await
            .expect_err("no answer");
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{:?}",
            started.elapsed()
        );
        assert!(!error.0.contains("redis://"), "no URL in errors: {error}");
        assert!(store.health().await.is_err());
    }

    // Nothing listening at all: refused at once.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    };
    let store = RedisStore::connect(&format!("redis://{closed}/0"), options).expect("store");
    let started = std::time::Instant::now();
    assert!(store.snapshot(&c(), &limits, 0).await.is_err());
    assert!(started.elapsed() < Duration::from_millis(1000));
}

#[test]
fn lease_ids_do_not_repeat() {
    let ids = LeaseIds::new();
    let seen: HashSet<u64> = (0..200_000).map(|_| ids.next()).collect();
    assert_eq!(seen.len(), 200_000);
    let other = LeaseIds::new();
    assert!(
        !seen.contains(&other.next()),
        "another instance starts elsewhere"
    );
}

#[test]
fn the_minute_is_the_same_in_both_units() {
    // The scripts count microseconds; window.rs nanoseconds.
    assert_eq!(MINUTE / 1000, 60_000_000);
    assert!(COMMON.contains("local MINUTE = 60000000"));
}

/// The store suite every backend passes, on a Redis Cluster: each script
/// runs whole on its client's slot, so reservations stay atomic there too;
/// and deployment health, whose keys lie on several slots, is read one key
/// at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_store_suite_and_shared_health_hold_on_a_redis_cluster() {
    use crate::budget::store::tests as suite;

    let Some(cluster) = cluster::RedisCluster::start().await else {
        return;
    };
    // A store timeout no stall of a loaded machine reaches: the suite is
    // about what the cluster holds, not how fast.
    let options = |prefix: &str| RedisOptions {
        timeout: Duration::from_secs(15),
        ..test_options(prefix, RedisClock::Caller)
    };
    let store = |prefix: &str| -> Arc<dyn Store> {
        RedisStore::connect(&cluster.url(), options(prefix)).expect("store")
    };
    suite::reserve_is_all_or_nothing(store("all-or-nothing")).await;
    suite::settle_replaces_the_reservation(store("settle")).await;
    suite::release_keeps_only_the_request(store("release")).await;
    suite::clients_are_isolated(store("isolated")).await;
    suite::concurrent_reservations_never_overspend(store("concurrent")).await;
    suite::health_and_flush_answer(store("health")).await;

    // Deployments whose keys hash to different primaries.
    let deployments: Vec<Arc<str>> = ["one", "two", "three", "four"]
        .into_iter()
        .map(Arc::from)
        .collect();
    let mut primaries = HashSet::new();
    for deployment in &deployments {
        let (_, cooling) = health_keys("cooldowns", deployment);
        primaries.insert(cluster.primary_for(&cooling).await);
    }
    assert!(primaries.len() > 1, "all on one primary: {primaries:?}");
    let store = RedisStore::connect(&cluster.url(), options("cooldowns")).expect("store");
    store
        .share_cooldown("one", Duration::from_secs(60))
        .await
        .expect("cooldown");
    for _ in 0..2 {
        store
            .share_failure("three", Duration::from_secs(10), 2, Duration::from_secs(30))
            .await
            .expect("failure");
    }
    let left = store.shared_cooldowns(&deployments).await.expect("read");
    // What is left of each cooldown: which one it is shows, however long the
    // machine took between setting and reading them.
    let between = |d: Option<Duration>, low: u64, high: u64| {
        d.is_some_and(|d| d > Duration::from_secs(low) && d <= Duration::from_secs(high))
    };
    assert!(between(left[0], 30, 60), "{left:?}");
    assert_eq!(left[1], None);
    assert!(between(left[2], 0, 30), "{left:?}");
    assert_eq!(left[3], None);
}
