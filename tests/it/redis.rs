//! Several Iris instances sharing budgets through Redis: concurrent load on
//! two and three instances never overspends, a Redis crash and restart is
//! survived as `store.on_unavailable` says (without restarting Iris), and a
//! reservation whose instance died stops blocking its client when its lease
//! ends.
//!
//! Without Redis these tests say they were skipped and pass, unless
//! `IRIS_REQUIRE_REDIS=1` (see tests/it/support/redis.rs).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use iris::budget::Account;
use iris::budget::store::Party;
use iris::budget::window::Charge;
use serde_json::{Value, json};

use crate::support::redis::{RedisProcess, SharedRedis, store_toml, with_store};
use crate::support::{
    Iris, KEY_B, MockUpstream, base_config, chat_body, metric_sum, o200k, status_and_json,
    usage_row,
};

/// An Iris on `store` (a `[store]` table); client `b` has `budget`.
async fn iris(upstream: &MockUpstream, store: &str, budget: &str) -> Iris {
    let config = base_config(&upstream.base_url(), &format!("[clients.budget]\n{budget}"));
    Iris::start(&with_store(&config, store)).await
}

/// A chat request as client `b`, answered by the mock after `delay_ms`.
async fn chat(iris: &Iris, body: &Value, delay_ms: u64) -> (u16, Value) {
    let delay = delay_ms.to_string();
    status_and_json(iris.chat(KEY_B, body, &[("x-mock-delay-ms", &delay)]).await).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_and_three_instances_under_load_never_overspend_one_budget() {
    for instances in [2, 3] {
        let Some(redis) = SharedRedis::get().await else {
            return;
        };
        let upstream = MockUpstream::start().await;
        let store = redis.store_toml("timeout_ms = 2000");
        let mut fleet = Vec::new();
        for _ in 0..instances {
            fleet.push(Arc::new(
                iris(&upstream, &store, "tokens_per_day = 1000").await,
            ));
        }
        let mut body = chat_body("other-model");
        body["max_tokens"] = json!(50);
        let reserved = o200k::SAY_HELLO + 50;

        let mut tasks = Vec::new();
        for i in 0..60 {
            let iris = Arc::clone(&fleet[i % instances]);
            let body = body.clone();
            tasks.push(tokio::spawn(async move { chat(&iris, &body, 200).await }));
        }
        let (mut admitted, mut charged) = (0, 0);
        for task in tasks {
            match task.await.unwrap() {
                (200, answer) => {
                    admitted += 1;
                    charged += answer["usage"]["total_tokens"].as_u64().unwrap();
                }
                (429, answer) => assert_eq!(answer["error"]["code"], "insufficient_quota"),
                (status, answer) => panic!("unexpected {status}: {answer}"),
            }
        }
        assert!(admitted > 0);
        assert_eq!(upstream.received().len() as u64, admitted);
        for iris in &fleet {
            iris.settled(KEY_B).await;
        }
        assert!(
            charged <= 1000,
            "{instances} instances charged {charged} of 1000 ({admitted} requests of {reserved} reserved)"
        );
        // Every instance reports the one shared figure.
        for iris in &fleet {
            assert_eq!(iris.used(KEY_B, "tokens_per_day").await, charged);
        }
        // And the budget is spent for all of them: the next request that does
        // not fit is refused whichever instance it reaches.
        let left = 1000 - charged;
        if left < reserved {
            for iris in &fleet {
                assert_eq!(chat(iris, &body, 0).await.0, 429);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_concurrent_holds_across_instances() {
    let Some(redis) = SharedRedis::get().await else {
        return;
    };
    let upstream = MockUpstream::start().await;
    let store = redis.store_toml("timeout_ms = 2000");
    let mut fleet = Vec::new();
    for _ in 0..3 {
        fleet.push(Arc::new(
            iris(&upstream, &store, "max_concurrent = 4").await,
        ));
    }
    let mut tasks = Vec::new();
    for i in 0..12 {
        let iris = Arc::clone(&fleet[i % 3]);
        tasks.push(tokio::spawn(async move {
            chat(&iris, &chat_body("other-model"), 1500).await
        }));
    }
    let mut admitted = 0;
    for task in tasks {
        match task.await.unwrap() {
            (200, _) => admitted += 1,
            (429, answer) => assert_eq!(answer["error"]["code"], "rate_limit_exceeded"),
            (status, answer) => panic!("unexpected {status}: {answer}"),
        }
    }
    assert_eq!(admitted, 4, "four slots across three instances");
    fleet[0].settled(KEY_B).await;
}

/// Requests from one task until `stop`: each status, and the slowest answer.
fn keep_asking(
    iris: Arc<Iris>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(Vec<u16>, Duration)> {
    tokio::spawn(async move {
        let (mut statuses, mut slowest) = (Vec::new(), Duration::ZERO);
        while !stop.load(Ordering::SeqCst) {
            let started = Instant::now();
            let (status, answer) = chat(&iris, &chat_body("other-model"), 0).await;
            slowest = slowest.max(started.elapsed());
            if status == 503 {
                assert_eq!(answer["error"]["code"], "store_unavailable", "{answer}");
            }
            statuses.push(status);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (statuses, slowest)
    })
}

/// The sum of metric `name` for client `b`.
async fn metric(iris: &Iris, name: &str) -> u64 {
    metric_sum(&iris.metrics().await, name, &["client=\"b\""]) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_crash_and_restart_is_survived_as_on_unavailable_says() {
    let Some(mut redis) = RedisProcess::prepare() else {
        return;
    };
    let upstream = MockUpstream::start().await;
    let store = |mode: &str| {
        store_toml(
            &redis.url(),
            "iris",
            &format!("on_unavailable = \"{mode}\"\ntimeout_ms = 300"),
        )
    };
    // Iris starts while Redis is still down: running, not ready.
    let reject = Arc::new(iris(&upstream, &store("reject"), "tokens_per_day = 1000000").await);
    let allow = Arc::new(iris(&upstream, &store("allow"), "tokens_per_day = 1000000").await);
    assert_eq!(reject.status("/readyz").await, 503);
    redis.start().await;
    for iris in [&reject, &allow] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while iris.status("/readyz").await != 200 {
            assert!(Instant::now() < deadline, "not ready once Redis answers");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    let stop = Arc::new(AtomicBool::new(false));
    let rejecting = keep_asking(Arc::clone(&reject), Arc::clone(&stop));
    let allowing = keep_asking(Arc::clone(&allow), Arc::clone(&stop));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fallbacks_before = metric(&allow, "iris_budget_store_fallback_total").await;

    redis.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(chat(&reject, &chat_body("other-model"), 0).await.0, 503);
    assert_eq!(chat(&allow, &chat_body("other-model"), 0).await.0, 200);
    assert_eq!(
        reject.status("/readyz").await,
        503,
        "readiness follows the store"
    );
    assert_eq!(
        allow.status("/readyz").await,
        200,
        "in allow mode an instance stays ready: it serves through the outage"
    );
    let fallbacks_during = metric(&allow, "iris_budget_store_fallback_total").await;
    assert!(
        fallbacks_during > fallbacks_before,
        "counted locally: {fallbacks_before} -> {fallbacks_during}"
    );

    // Redis comes back empty (no persistence), on the same port.
    redis.start().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while chat(&reject, &chat_body("other-model"), 0).await.0 != 200 {
        assert!(Instant::now() < deadline, "Iris did not recover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    let (rejected, slowest_rejecting) = rejecting.await.unwrap();
    let (allowed, slowest_allowing) = allowing.await.unwrap();

    assert!(rejected.contains(&503), "{rejected:?}");
    assert!(
        rejected.iter().all(|s| [200, 503].contains(s)),
        "{rejected:?}"
    );
    assert_eq!(rejected.last(), Some(&200), "recovered: {rejected:?}");
    assert!(allowed.iter().all(|s| *s == 200), "{allowed:?}");
    for slowest in [slowest_rejecting, slowest_allowing] {
        assert!(
            slowest < Duration::from_secs(2),
            "a request waited {slowest:?} on a dead Redis"
        );
    }
    for iris in [&reject, &allow] {
        assert_eq!(iris.status("/readyz").await, 200);
    }

    // Both count in Redis again: the outage's local count was not copied
    // over, so the fresh Redis holds exactly what was charged since.
    let fallbacks_after = metric(&allow, "iris_budget_store_fallback_total").await;
    allow.settled(KEY_B).await;
    let before = reject.used(KEY_B, "tokens_per_day").await;
    let (status, answer) = chat(&allow, &chat_body("other-model"), 0).await;
    assert_eq!(status, 200);
    allow.settled(KEY_B).await;
    assert_eq!(
        reject.used(KEY_B, "tokens_per_day").await,
        before + answer["usage"]["total_tokens"].as_u64().unwrap(),
        "the allowing instance charges Redis again"
    );
    assert_eq!(
        metric(&allow, "iris_budget_store_fallback_total").await,
        fallbacks_after
    );
}

#[tokio::test]
async fn an_expired_lease_frees_a_stuck_reservation() {
    use iris::budget::store::{RedisClock, RedisOptions, RedisStore, Store};

    let Some(redis) = SharedRedis::get().await else {
        return;
    };
    let upstream = MockUpstream::start().await;
    let iris = iris(
        &upstream,
        &redis.store_toml("timeout_ms = 2000"),
        "max_concurrent = 1",
    )
    .await;

    // Another instance reserves the client's only slot and dies before
    // settling: its reservation is never given back.
    let dead = RedisStore::connect(
        &redis.url,
        RedisOptions {
            prefix: redis.prefix.clone(),
            lease: Duration::from_millis(1500),
            timeout: Duration::from_secs(2),
            clock: RedisClock::Server,
        },
    )
    .unwrap();
    let limits = iris::budget::Limits {
        max_concurrent: Some(1),
        ..Default::default()
    };
    let reserved = dead
        .reserve(
            &Party::alone(Account::client("b"), limits),
            Charge::tokens(10),
            0,
        )
        .await
        .unwrap();
    assert!(reserved.outcome.is_ok());
    let leased_at = Instant::now();
    drop(dead);

    let (status, answer) = chat(&iris, &chat_body("other-model"), 0).await;
    assert_eq!(status, 429, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_concurrent")
    );
    assert_eq!(iris.used(KEY_B, "max_concurrent").await, 1);

    // At the lease's end the slot is free again, without any settle.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = chat(&iris, &chat_body("other-model"), 0).await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 429);
        assert!(
            Instant::now() < deadline,
            "the stuck reservation never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        leased_at.elapsed() >= Duration::from_millis(1400),
        "freed by the lease, not earlier: {:?}",
        leased_at.elapsed()
    );
    iris.settled(KEY_B).await;
}

/// A Redis server of the test's own (it may be stopped and watched) and a
/// store on it; `None` (the test skips) where redis-server is missing.
async fn private_store(
    timeout: Duration,
) -> Option<(
    RedisProcess,
    std::sync::Arc<iris::budget::store::RedisStore>,
)> {
    use iris::budget::store::{RedisClock, RedisOptions, RedisStore};

    let mut redis = RedisProcess::prepare()?;
    redis.start().await;
    let store = RedisStore::connect(
        &redis.url(),
        RedisOptions {
            prefix: "iris".into(),
            lease: Duration::from_secs(600),
            timeout,
            clock: RedisClock::Server,
        },
    )
    .unwrap();
    Some((redis, store))
}

#[tokio::test]
async fn a_reservation_whose_answer_was_lost_is_given_back() {
    use iris::budget::store::Store;

    let Some((redis, store)) = private_store(Duration::from_millis(300)).await else {
        return;
    };
    let limits = iris::budget::Limits {
        tokens_per_day: Some(1000),
        max_concurrent: Some(1),
        ..Default::default()
    };
    // Scripts loaded (a script unknown to Redis would not run at all).
    let warm = Party::alone(Account::client("warm"), limits);
    let hold = store.reserve(&warm, Charge::tokens(1), 0).await.unwrap();
    store
        .settle(&warm, hold.outcome.unwrap(), Charge::tokens(1), 0)
        .await
        .unwrap();

    // Redis holds every write for a second: the reservation times out here,
    // and runs there afterwards.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut admin = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(1000)
        .arg("WRITE")
        .query_async(&mut admin)
        .await
        .unwrap();
    let started = Instant::now();
    assert!(
        store
            .reserve(
                &Party::alone(Account::client("c"), limits),
                Charge::tokens(10),
                0
            )
            .await
            .is_err()
    );
    assert!(started.elapsed() < Duration::from_millis(900));

    // Once Redis resumes, the reservation ran, and the cancel behind it gave
    // it back: no slot held for the lease's ten minutes, no tokens charged.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let now = store
        .snapshot(&Account::client("c"), &limits, 0)
        .await
        .unwrap();
    let used = |window| now.get(window).used;
    use iris::budget::window::Window;
    assert_eq!(used(Window::MaxConcurrent), 0);
    assert_eq!(used(Window::TokensPerDay), 0);
    assert!(
        store
            .reserve(
                &Party::alone(Account::client("c"), limits),
                Charge::tokens(10),
                0
            )
            .await
            .unwrap()
            .outcome
            .is_ok()
    );
}

#[tokio::test]
async fn iris_usage_reads_the_shared_budgets() {
    let Some(redis) = SharedRedis::get().await else {
        return;
    };
    let upstream = MockUpstream::start().await;
    let config = with_store(
        &base_config(
            &upstream.base_url(),
            "[clients.budget]\ntokens_per_day = 100000",
        ),
        &redis.store_toml(""),
    );
    let iris = Iris::start(&config).await;
    assert_eq!(chat(&iris, &chat_body("other-model"), 0).await.0, 200);
    iris.settled(KEY_B).await;
    let charged = iris.used(KEY_B, "tokens_per_day").await;
    assert!(charged > 0);

    assert_eq!(
        usage_row(&config, "b", "tokens_per_day")[..4],
        ["b", "tokens_per_day", "100000", &charged.to_string()]
    );
}

#[tokio::test]
async fn reserving_and_settling_are_one_round_trip_each() {
    use iris::budget::store::Store;

    let Some((redis, store)) = private_store(Duration::from_secs(2)).await else {
        return;
    };
    let limits = iris::budget::Limits {
        requests_per_minute: Some(1000),
        tokens_per_minute: Some(100_000),
        tokens_per_day: Some(1_000_000),
        tokens_per_month: Some(10_000_000),
        max_concurrent: Some(10),
        ..Default::default()
    };
    let spend = async |client: &str| {
        let client = Party::alone(Account::client(client), limits);
        let hold = store
            .reserve(&client, Charge::tokens(100), 0)
            .await
            .unwrap();
        store
            .settle(&client, hold.outcome.unwrap(), Charge::tokens(80), 0)
            .await
            .unwrap();
    };
    // The first use loads the scripts into Redis.
    spend("warm").await;
    let client = redis::Client::open(redis.url()).unwrap();
    let mut admin = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut admin)
        .await
        .unwrap();
    for i in 0..10 {
        spend(&format!("client-{i}")).await;
    }
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut admin)
        .await
        .unwrap();
    // Commands the scripts run inside Redis are listed too (get, hset...);
    // what Iris sent is the EVALSHAs, and nothing else.
    let sent: Vec<&str> = stats
        .lines()
        .filter(|line| {
            [
                "cmdstat_evalsha:",
                "cmdstat_eval:",
                "cmdstat_script",
                "cmdstat_ping:",
            ]
            .iter()
            .any(|name| line.starts_with(name))
        })
        .collect();
    assert_eq!(sent.len(), 1, "{stats}");
    assert!(sent[0].starts_with("cmdstat_evalsha:calls=20,"), "{stats}");
}
