//! Iris on a Redis Cluster and on a Sentinel-managed primary, each a private
//! deployment started by the test (`support::redis_cluster`): budgets shared
//! by two instances, and failovers while requests run: the outage policy
//! applies during the switch, nothing after it, and no request is charged
//! twice.
//!
//! Without `redis-server`/`redis-cli` these tests say they were skipped and
//! pass, unless `IRIS_REQUIRE_REDIS=1`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::redis::{store_toml, with_store};
use crate::support::redis_cluster::{RedisCluster, RedisSentinels};
use crate::support::{
    Iris, KEY_A, KEY_B, MockUpstream, admin_toml, base_config, chat_body, metric_sum, o200k,
    status_and_json,
};

/// An Iris on `url` (with `extra` in its `[store]`); client `b` has
/// `budget`.
async fn iris(upstream: &MockUpstream, url: &str, extra: &str, budget: &str) -> Iris {
    let config = base_config(
        &upstream.base_url(),
        &format!("{}\n[clients.budget]\n{budget}", admin_toml()),
    );
    Iris::start(&with_store(&config, &store_toml(url, "iris", extra))).await
}

/// A small request: its reservation (prompt + 20) stays close to what the
/// mock reports it used (prompt + 7).
fn body() -> Value {
    let mut body = chat_body("other-model");
    body["max_tokens"] = json!(20);
    body
}

/// What Iris reserves for [`body`].
fn reserved() -> u64 {
    o200k::SAY_HELLO + 20
}

/// One request's outcome: when it was sent, its status, the tokens it
/// used (200 only).
#[derive(Debug, Clone, Copy)]
struct Outcome {
    sent: Instant,
    status: u16,
    tokens: u64,
}

/// Requests with `key` from one task until `stop`, each checked for its
/// shape (200, or 503 `store_unavailable`).
fn keep_asking(
    iris: Arc<Iris>,
    key: &'static str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Outcome>> {
    tokio::spawn(async move {
        let mut outcomes = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            let sent = Instant::now();
            let (status, answer) = status_and_json(iris.chat(key, &body(), &[]).await).await;
            let tokens = match status {
                200 => answer["usage"]["total_tokens"].as_u64().unwrap(),
                503 => {
                    assert_eq!(answer["error"]["code"], "store_unavailable", "{answer}");
                    0
                }
                _ => panic!("unexpected {status}: {answer}"),
            };
            outcomes.push(Outcome {
                sent,
                status,
                tokens,
            });
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        outcomes
    })
}

async fn collect(tasks: Vec<tokio::task::JoinHandle<Vec<Outcome>>>) -> Vec<Outcome> {
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all.sort_by_key(|o| o.sent);
    all
}

fn statuses(outcomes: &[Outcome]) -> Vec<u16> {
    outcomes.iter().map(|o| o.status).collect()
}

fn charged(outcomes: &[Outcome]) -> u64 {
    outcomes.iter().map(|o| o.tokens).sum()
}

/// Until a request as `key` is admitted again: how long that took, and the
/// admitted request's outcome.
async fn until_admitted(iris: &Iris, key: &str, within: Duration) -> (Duration, Outcome) {
    let start = Instant::now();
    loop {
        let sent = Instant::now();
        let (status, answer) = status_and_json(iris.chat(key, &body(), &[]).await).await;
        if status == 200 {
            let tokens = answer["usage"]["total_tokens"].as_u64().unwrap();
            let outcome = Outcome {
                sent,
                status,
                tokens,
            };
            return (start.elapsed(), outcome);
        }
        assert!(start.elapsed() < within, "Iris did not recover");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_on_a_cluster_never_overspend_one_budget() {
    let Some(cluster) = RedisCluster::start().await else {
        return;
    };
    // The clients' keys live on different primaries: each script is sent to
    // its own slot's node.
    assert_ne!(
        cluster.primary_for("iris:v1:{a}:day").await,
        cluster.primary_for("iris:v1:{b}:day").await
    );
    let upstream = MockUpstream::start().await;
    let url = cluster.url();
    let fleet = [
        Arc::new(
            iris(
                &upstream,
                &url,
                "timeout_ms = 2000",
                "tokens_per_day = 1000",
            )
            .await,
        ),
        Arc::new(
            iris(
                &upstream,
                &url,
                "timeout_ms = 2000",
                "tokens_per_day = 1000",
            )
            .await,
        ),
    ];
    for iris in &fleet {
        assert_eq!(iris.status("/readyz").await, 200, "ready on the cluster");
    }

    let mut tasks = Vec::new();
    for i in 0..60 {
        let iris = Arc::clone(&fleet[i % 2]);
        tasks.push(tokio::spawn(async move {
            let delay = [("x-mock-delay-ms", "100")];
            let key = if i % 3 == 0 { KEY_A } else { KEY_B };
            let (status, answer) = status_and_json(iris.chat(key, &body(), &delay).await).await;
            (key, status, answer)
        }));
    }
    let mut charged_b = 0;
    for task in tasks {
        match task.await.unwrap() {
            (KEY_B, 200, answer) => charged_b += answer["usage"]["total_tokens"].as_u64().unwrap(),
            (_, 200, _) => {}
            (KEY_B, 429, answer) => assert_eq!(answer["error"]["code"], "insufficient_quota"),
            (_, status, answer) => panic!("unexpected {status}: {answer}"),
        }
    }
    for iris in &fleet {
        iris.settled(KEY_B).await;
        iris.settled(KEY_A).await;
    }
    assert!(charged_b > 0);
    assert!(charged_b <= 1000, "charged {charged_b} of 1000");
    for iris in &fleet {
        assert_eq!(iris.used(KEY_B, "tokens_per_day").await, charged_b);
    }
    if 1000 - charged_b < reserved() {
        for iris in &fleet {
            assert_eq!(iris.chat(KEY_B, &body(), &[]).await.status(), 429);
        }
    }

    // Managed clients are shared through the cluster too.
    let key = fleet[0]
        .create_client(r#"{"name": "team-c", "budget": {"tokens_per_day": 100000}}"#)
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fleet[1].key_works(&key).await {
        assert!(Instant::now() < deadline, "the other instance never saw it");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instance_started_before_its_cluster_serves_once_the_cluster_is_up() {
    let Some(mut cluster) = RedisCluster::prepare() else {
        return;
    };
    let upstream = MockUpstream::start().await;
    let iris = iris(
        &upstream,
        &cluster.url(),
        "timeout_ms = 300",
        "tokens_per_day = 100000",
    )
    .await;
    assert_eq!(iris.status("/readyz").await, 503, "not ready without Redis");
    let started = Instant::now();
    assert_eq!(iris.chat(KEY_B, &body(), &[]).await.status(), 503);
    assert!(started.elapsed() < Duration::from_secs(2), "fails fast");

    cluster.launch().await;
    let (waited, _) = until_admitted(&iris, KEY_B, Duration::from_secs(10)).await;
    eprintln!("admitted {waited:?} after the cluster was up");
    assert_eq!(iris.status("/readyz").await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crashed_primary_is_failed_over_as_on_unavailable_says_and_nothing_is_charged_twice() {
    let Some(mut cluster) = RedisCluster::start().await else {
        return;
    };
    let upstream = MockUpstream::start().await;
    let url = cluster.url();
    let extra = |mode: &str| format!("on_unavailable = \"{mode}\"\ntimeout_ms = 300");
    let budget = "tokens_per_day = 10000000";
    let reject = Arc::new(iris(&upstream, &url, &extra("reject"), budget).await);
    let allow = Arc::new(iris(&upstream, &url, &extra("allow"), budget).await);
    let victim = cluster.primary_for("iris:v1:{b}:day").await;
    let other = cluster.primary_for("iris:v1:{a}:day").await;
    assert_ne!(victim, other);
    let replica = cluster.replica_of(victim).await;

    let stop = Arc::new(AtomicBool::new(false));
    let rejecting: Vec<_> = (0..3)
        .map(|_| keep_asking(Arc::clone(&reject), KEY_B, Arc::clone(&stop)))
        .collect();
    let allowing = keep_asking(Arc::clone(&allow), KEY_B, Arc::clone(&stop));
    let elsewhere = keep_asking(Arc::clone(&reject), KEY_A, Arc::clone(&stop));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fallbacks = async || {
        metric_sum(
            &allow.metrics().await,
            "iris_budget_store_fallback_total",
            &["client=\"b\""],
        ) as u64
    };
    let fallbacks_before = fallbacks().await;

    let killed = Instant::now();
    cluster.kill(victim);
    cluster.wait_promoted(replica).await;
    let promoted = killed.elapsed();
    let (waited, first) = until_admitted(&reject, KEY_B, Duration::from_secs(15)).await;
    let recovered = promoted + waited;
    // Requests keep running a while on the new primary.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::SeqCst);
    let mut rejected = collect(rejecting).await;
    rejected.push(first);
    let allowed = collect(vec![allowing]).await;
    let unaffected = collect(vec![elsewhere]).await;

    // During the switch the outage policy: 503 in reject mode...
    assert!(
        statuses(&rejected).contains(&503),
        "{:?}",
        statuses(&rejected)
    );
    // ...admitted and counted locally in allow mode.
    assert!(
        statuses(&allowed).iter().all(|s| *s == 200),
        "{:?}",
        statuses(&allowed)
    );
    let counted_locally = fallbacks().await - fallbacks_before;
    assert!(counted_locally > 0);
    // The client on another primary is served throughout.
    assert!(
        statuses(&unaffected).iter().all(|s| *s == 200),
        "{:?}",
        statuses(&unaffected)
    );
    // None after: every request sent once Iris admitted again succeeded.
    let after: Vec<u16> = rejected
        .iter()
        .filter(|o| o.sent >= killed + recovered)
        .map(|o| o.status)
        .collect();
    assert!(after.len() >= 10, "{after:?}");
    assert!(after.iter().all(|s| *s == 200), "{after:?}");
    assert!(
        recovered < Duration::from_secs(10),
        "recovered after {recovered:?}"
    );

    // Nothing charged twice, nothing lost. A reservation is never resent, and
    // a settlement resent after a lost answer changes nothing the second
    // time, so Redis never holds more than the requests reported. It may
    // hold less only by what a primary acknowledged and died before passing
    // on (replication is asynchronous): at most the request each task had
    // in flight at the crash.
    reject.settled(KEY_B).await;
    let used = reject.used(KEY_B, "tokens_per_day").await;
    // Every request reports the same usage; those the allowing instance
    // counted locally never reached Redis.
    let each = rejected.iter().find(|o| o.status == 200).unwrap().tokens;
    let reported = charged(&rejected) + charged(&allowed) - counted_locally * each;
    let lost_at_most = 4 * each;
    eprintln!(
        "cluster failover: replica promoted {promoted:?} after the kill, Iris admitting again \
         {recovered:?} after the kill; {} of {} requests answered 503; Redis holds {used} \
         tokens, the requests reported {reported}",
        rejected.iter().filter(|o| o.status == 503).count(),
        rejected.len()
    );
    assert!(
        used <= reported,
        "Redis holds {used}, requests reported {reported}"
    );
    assert!(
        used + lost_at_most >= reported,
        "Redis holds {used}, requests reported {reported}"
    );
    // And exactly from now on.
    let before = reject.used(KEY_B, "tokens_per_day").await;
    let mut spent = 0;
    for _ in 0..5 {
        let (status, answer) = status_and_json(reject.chat(KEY_B, &body(), &[]).await).await;
        assert_eq!(status, 200, "{answer}");
        spent += answer["usage"]["total_tokens"].as_u64().unwrap();
    }
    reject.settled(KEY_B).await;
    assert_eq!(reject.used(KEY_B, "tokens_per_day").await, before + spent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_graceful_failover_charges_every_request_exactly_once() {
    let Some(cluster) = RedisCluster::start().await else {
        return;
    };
    let upstream = MockUpstream::start().await;
    let url = cluster.url();
    let budget = "tokens_per_day = 10000000";
    let fleet = [
        Arc::new(iris(&upstream, &url, "timeout_ms = 2000", budget).await),
        Arc::new(iris(&upstream, &url, "timeout_ms = 2000", budget).await),
    ];
    let primary = cluster.primary_for("iris:v1:{b}:day").await;
    let replica = cluster.replica_of(primary).await;

    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..4)
        .map(|i| keep_asking(Arc::clone(&fleet[i % 2]), KEY_B, Arc::clone(&stop)))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.manual_failover(replica).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::SeqCst);
    let outcomes = collect(tasks).await;
    assert_eq!(
        cluster.primary_for("iris:v1:{b}:day").await,
        replica,
        "switched"
    );

    // The old primary answered MOVED to what it had not run; Iris sent
    // those again to the new one, and nothing else.
    for iris in &fleet {
        iris.settled(KEY_B).await;
    }
    let used = fleet[0].used(KEY_B, "tokens_per_day").await;
    let refused = outcomes.iter().filter(|o| o.status == 503).count();
    eprintln!(
        "graceful failover: {} requests, {refused} answered 503, {used} tokens",
        outcomes.len(),
    );
    // A graceful switch refuses nothing: what the old primary did not run
    // it answered with MOVED, and Iris ran it on the new one.
    assert_eq!(refused, 0, "{:?}", statuses(&outcomes));
    assert_eq!(used, charged(&outcomes), "{:?}", statuses(&outcomes));
    assert_eq!(fleet[1].used(KEY_B, "tokens_per_day").await, used);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sentinel_is_followed_to_the_new_primary() {
    let Some(mut sentinels) = RedisSentinels::start().await else {
        return;
    };
    let upstream = MockUpstream::start().await;
    let url = sentinels.url();
    let reject = Arc::new(
        iris(
            &upstream,
            &url,
            "on_unavailable = \"reject\"\ntimeout_ms = 300",
            "tokens_per_day = 10000000",
        )
        .await,
    );
    assert_eq!(reject.status("/readyz").await, 200);
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..3)
        .map(|_| keep_asking(Arc::clone(&reject), KEY_B, Arc::clone(&stop)))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let killed = Instant::now();
    sentinels.kill_primary();
    sentinels.wait_failover().await;
    let promoted = killed.elapsed();
    let (waited, first) = until_admitted(&reject, KEY_B, Duration::from_secs(15)).await;
    let recovered = promoted + waited;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::SeqCst);
    let mut outcomes = collect(tasks).await;
    outcomes.push(first);
    assert!(statuses(&outcomes).contains(&503));
    let after: Vec<u16> = outcomes
        .iter()
        .filter(|o| o.sent >= killed + recovered)
        .map(|o| o.status)
        .collect();
    assert!(after.len() >= 10, "{after:?}");
    assert!(after.iter().all(|s| *s == 200), "{after:?}");
    assert_eq!(reject.status("/readyz").await, 200);

    // The budget lives on the new primary, with what the old one had passed
    // on: nothing twice, and at most the requests in flight at the crash
    // lost (as on a cluster, above).
    reject.settled(KEY_B).await;
    let used = reject.used(KEY_B, "tokens_per_day").await;
    let reported = charged(&outcomes);
    let lost_at_most = 3 * first.tokens;
    eprintln!(
        "sentinel failover: replica promoted {promoted:?} after the kill, Iris admitting again \
         {recovered:?} after the kill; {} of {} requests answered 503; Redis holds {used} \
         tokens, the requests reported {reported}",
        outcomes.iter().filter(|o| o.status == 503).count(),
        outcomes.len()
    );
    assert!(
        used <= reported,
        "Redis holds {used}, requests reported {reported}"
    );
    assert!(
        used + lost_at_most >= reported,
        "Redis holds {used}, requests reported {reported}"
    );
    let port = sentinels.replica_port();
    let mut admin = crate::support::redis_cluster::admin(port).await;
    let day: Option<u64> = redis::cmd("HGET")
        .arg("iris:v1:{b}:day")
        .arg("u")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(day, Some(used), "read from the promoted replica");
}

/// A team on a Redis Cluster: its members' requests are reserved against
/// the member and the team in one script, so the member's keys live in the
/// team's slot (else the cluster refuses the script: CROSSSLOT). Two
/// instances, two members, one team budget: never overspent, and every
/// instance reads the same team and member windows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_team_on_a_cluster_is_reserved_with_its_members_in_one_slot() {
    let Some(cluster) = RedisCluster::start().await else {
        return;
    };
    let upstream = MockUpstream::start().await;
    let url = cluster.url();
    let config = base_config(&upstream.base_url(), "")
        .replace(
            "[[clients]]\nname = \"a\"\n",
            "[[clients]]\nname = \"a\"\nteam = \"blue\"\n",
        )
        .replace(
            "[[clients]]\nname = \"b\"\n",
            "[[clients]]\nname = \"b\"\nteam = \"blue\"\n",
        )
        + "\n[[teams]]\nname = \"blue\"\n[teams.budget]\ntokens_per_day = 1000\n";
    assert!(config.matches("team = \"blue\"").count() == 2, "{config}");
    let config = with_store(&config, &store_toml(&url, "iris", "timeout_ms = 2000"));
    let fleet = [
        Arc::new(Iris::start(&config).await),
        Arc::new(Iris::start(&config).await),
    ];
    let mut tasks = Vec::new();
    for i in 0..40 {
        let iris = Arc::clone(&fleet[i % 2]);
        tasks.push(tokio::spawn(async move {
            let key = if i % 3 == 0 { KEY_A } else { KEY_B };
            let delay = [("x-mock-delay-ms", "100")];
            let (status, answer) = status_and_json(iris.chat(key, &body(), &delay).await).await;
            (status, answer)
        }));
    }
    let (mut charged, mut admitted) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            (200, answer) => {
                admitted += 1;
                charged += answer["usage"]["total_tokens"].as_u64().unwrap();
            }
            (429, answer) => {
                assert_eq!(answer["error"]["code"], "insufficient_quota", "{answer}");
                let message = answer["error"]["message"].as_str().unwrap();
                assert!(message.contains("team blue"), "{message}");
            }
            (status, answer) => panic!("unexpected {status}: {answer}"),
        }
    }
    for iris in &fleet {
        iris.settled(KEY_A).await;
        iris.settled(KEY_B).await;
    }
    println!("cluster team: 40 sent, {admitted} admitted, {charged} of 1000 tokens charged");
    assert!(admitted > 0 && charged <= 1000, "charged {charged} of 1000");
    for iris in &fleet {
        let (a, b) = (iris.usage(KEY_A).await, iris.usage(KEY_B).await);
        assert_eq!(a["team"]["windows"]["tokens_per_day"]["used"], charged);
        assert_eq!(
            b["team"]["windows"]["tokens_per_day"]["used"], charged,
            "one team, read the same by each member"
        );
        let members = a["windows"]["tokens_per_day"]["used"].as_u64().unwrap()
            + b["windows"]["tokens_per_day"]["used"].as_u64().unwrap();
        assert_eq!(
            members, charged,
            "the members' windows add up to the team's"
        );
    }
}
