//! Iris on a Redis Cluster and on a Sentinel-managed primary, each a private
//! deployment started by the test (`support::redis_cluster`): budgets shared
//! by two instances, and failovers while requests run: the outage policy
//! applies during the switch, nothing after it, and no request is charged
//! twice.
//!
//! Without `redis-server`/`redis-cli` these tests say they were skipped and
//! pass, unless `IRIS_REQUIRE_REDIS=1`.
//!
//! Nothing here waits a fixed time or asserts how long something took: each
//! step waits for what it needs (requests flowing, a replica promoted, Iris
//! admitting again, enough requests after that) until [`WITHIN`], so a
//! loaded two-core machine only makes them slower. A store timeout is short
//! (300 ms) only on the instances that show the outage policy during a
//! switch; what must hold whatever the machine's load (other slots served
//! throughout, every request after the switch admitted, budgets read) is
//! checked on a patient instance, whose store timeout no stall reaches.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::redis::{store_toml, with_store};
use crate::support::redis_cluster::{RedisCluster, RedisSentinels, WITHIN};
use crate::support::{
    Iris, KEY_A, KEY_B, MockUpstream, admin_toml, base_config, chat_body, eventually, metric_sum,
    o200k, status_and_json,
};

/// `[store]` lines of an instance that shows the outage policy: a store
/// silent for 300 ms refuses (or, `allow`, counts locally).
fn hasty(on_unavailable: &str) -> String {
    format!("on_unavailable = \"{on_unavailable}\"\ntimeout_ms = 300")
}

/// `[store]` lines of an instance that waits out a stall of a loaded
/// machine (and a failover, often): only a store silent this long refuses.
const PATIENT: &str = "on_unavailable = \"reject\"\ntimeout_ms = 15000";

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
/// shape (200, or 503 `store_unavailable`) and counted in `done` once
/// answered.
fn keep_asking(
    iris: Arc<Iris>,
    key: &'static str,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
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
            done.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        outcomes
    })
}

/// Until `done` has counted `more` answers beyond what it had: with `tasks`
/// tasks asking, at least `more - tasks` of them were sent after the call.
async fn answered(done: &AtomicUsize, more: usize, what: &str) {
    let from = done.load(Ordering::SeqCst);
    eventually(WITHIN, what, async || {
        done.load(Ordering::SeqCst) >= from + more
    })
    .await;
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
async fn until_admitted(iris: &Iris, key: &str) -> (Duration, Outcome) {
    let within = WITHIN;
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
        assert!(
            start.elapsed() < within,
            "Iris did not admit {key} again within {within:?}: last {status} {answer}"
        );
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
        Arc::new(iris(&upstream, &url, PATIENT, "tokens_per_day = 1000").await),
        Arc::new(iris(&upstream, &url, PATIENT, "tokens_per_day = 1000").await),
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
    eventually(
        WITHIN,
        "the other instance sees the managed client",
        async || fleet[1].key_works(&key).await,
    )
    .await;
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
        &hasty("reject"),
        "tokens_per_day = 100000",
    )
    .await;
    assert_eq!(iris.status("/readyz").await, 503, "not ready without Redis");
    // Refused, rather than waiting for a cluster that is not there.
    let refused = tokio::time::timeout(WITHIN, iris.chat(KEY_B, &body(), &[]))
        .await
        .expect("a request waited for the cluster instead of being refused");
    assert_eq!(refused.status(), 503);

    cluster.launch().await;
    let (waited, _) = until_admitted(&iris, KEY_B).await;
    eprintln!("admitted {waited:?} after the cluster was up");
    eventually(WITHIN, "ready on the cluster", async || {
        iris.status("/readyz").await == 200
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crashed_primary_is_failed_over_as_on_unavailable_says_and_nothing_is_charged_twice() {
    let Some(mut cluster) = RedisCluster::start().await else {
        return;
    };
    let upstream = MockUpstream::start().await;
    let url = cluster.url();
    let budget = "tokens_per_day = 10000000";
    let reject = Arc::new(iris(&upstream, &url, &hasty("reject"), budget).await);
    let allow = Arc::new(iris(&upstream, &url, &hasty("allow"), budget).await);
    let patient = Arc::new(iris(&upstream, &url, PATIENT, budget).await);
    let victim = cluster.primary_for("iris:v1:{b}:day").await;
    let other = cluster.primary_for("iris:v1:{a}:day").await;
    assert_ne!(victim, other);
    let replica = cluster.replica_of(victim).await;

    let stop = Arc::new(AtomicBool::new(false));
    let ask = |iris: &Arc<Iris>, key, done: &Arc<AtomicUsize>| {
        keep_asking(Arc::clone(iris), key, Arc::clone(&stop), Arc::clone(done))
    };
    let (rejects, patients, others) = (Arc::default(), Arc::default(), Arc::default());
    let rejecting: Vec<_> = (0..2).map(|_| ask(&reject, KEY_B, &rejects)).collect();
    let waiting: Vec<_> = (0..2).map(|_| ask(&patient, KEY_B, &patients)).collect();
    let allowing = ask(&allow, KEY_B, &Arc::default());
    let elsewhere = ask(&patient, KEY_A, &others);
    answered(&rejects, 6, "requests flowing on the hasty instance").await;
    answered(&patients, 6, "requests flowing on the patient instance").await;
    let fallbacks = async || {
        metric_sum(
            &allow.metrics().await,
            "iris_budget_store_fallback_total",
            &["client=\"b\""],
        ) as u64
    };
    let fallbacks_before = fallbacks().await;

    // The replica catches up first: a write here, then `WAIT` for the
    // replica to acknowledge the replication stream up to it, so that what
    // the kill can lose (replication is asynchronous) is only what the
    // tasks wrote since, not however far a loaded machine let it lag.
    {
        let mut primary = crate::support::redis_cluster::admin(victim).await;
        let _: redis::RedisResult<()> = redis::cmd("SET")
            .arg("iris-test:{b}:sync")
            .arg(1)
            .query_async(&mut primary)
            .await;
        let _: redis::RedisResult<i64> = redis::cmd("WAIT")
            .arg(1)
            .arg(10_000)
            .query_async(&mut primary)
            .await;
    }
    let killed = Instant::now();
    cluster.kill(victim);
    cluster.wait_promoted(replica).await;
    let promoted = killed.elapsed();
    let (waited, first) = until_admitted(&reject, KEY_B).await;
    let recovered = promoted + waited;
    let (_, patient_first) = until_admitted(&patient, KEY_B).await;
    let patient_back = Instant::now();
    // Requests keep running on the new primary: at least ten sent after
    // the patient instance admitted again (two were in flight then).
    answered(&patients, 12, "requests after the switch").await;
    answered(&others, 3, "requests on the other primary").await;
    stop.store(true, Ordering::SeqCst);
    let mut rejected = collect(rejecting).await;
    rejected.push(first);
    let mut waited_out = collect(waiting).await;
    waited_out.push(patient_first);
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
    // The client on another primary is never refused.
    assert!(
        statuses(&unaffected).iter().all(|s| *s == 200),
        "{:?}",
        statuses(&unaffected)
    );
    // None after: every request sent once Iris admitted again succeeded.
    let after: Vec<u16> = waited_out
        .iter()
        .filter(|o| o.sent >= patient_back)
        .map(|o| o.status)
        .collect();
    assert!(after.len() >= 10, "{after:?}");
    assert!(after.iter().all(|s| *s == 200), "{after:?}");

    // Nothing charged twice, nothing lost. A reservation is never resent, and
    // a settlement resent after a lost answer changes nothing the second
    // time, so Redis never holds more than the requests reported. It may
    // hold less only by what a primary acknowledged and died before passing
    // on (replication is asynchronous): at most the request each task had
    // in flight at the crash.
    patient.settled(KEY_B).await;
    let used = patient.used(KEY_B, "tokens_per_day").await;
    // Every request reports the same usage; those the allowing instance
    // counted locally never reached Redis.
    let each = rejected.iter().find(|o| o.status == 200).unwrap().tokens;
    let reported =
        charged(&rejected) + charged(&waited_out) + charged(&allowed) - counted_locally * each;
    let lost_at_most = 5 * each;
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
    let before = patient.used(KEY_B, "tokens_per_day").await;
    let mut spent = 0;
    for _ in 0..5 {
        let (status, answer) = status_and_json(patient.chat(KEY_B, &body(), &[]).await).await;
        assert_eq!(status, 200, "{answer}");
        spent += answer["usage"]["total_tokens"].as_u64().unwrap();
    }
    patient.settled(KEY_B).await;
    assert_eq!(patient.used(KEY_B, "tokens_per_day").await, before + spent);
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
        Arc::new(iris(&upstream, &url, PATIENT, budget).await),
        Arc::new(iris(&upstream, &url, PATIENT, budget).await),
    ];
    let primary = cluster.primary_for("iris:v1:{b}:day").await;
    let replica = cluster.replica_of(primary).await;

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..4)
        .map(|i| {
            keep_asking(
                Arc::clone(&fleet[i % 2]),
                KEY_B,
                Arc::clone(&stop),
                Arc::clone(&done),
            )
        })
        .collect();
    answered(&done, 8, "requests flowing").await;
    cluster.manual_failover(replica).await;
    answered(&done, 8, "requests after the switch").await;
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
    let budget = "tokens_per_day = 10000000";
    let reject = Arc::new(iris(&upstream, &url, &hasty("reject"), budget).await);
    let patient = Arc::new(iris(&upstream, &url, PATIENT, budget).await);
    assert_eq!(patient.status("/readyz").await, 200);
    let stop = Arc::new(AtomicBool::new(false));
    let (rejects, patients) = (Arc::default(), Arc::default());
    let ask = |iris: &Arc<Iris>, done: &Arc<AtomicUsize>| {
        keep_asking(Arc::clone(iris), KEY_B, Arc::clone(&stop), Arc::clone(done))
    };
    let rejecting: Vec<_> = (0..2).map(|_| ask(&reject, &rejects)).collect();
    let waiting: Vec<_> = (0..2).map(|_| ask(&patient, &patients)).collect();
    answered(&rejects, 6, "requests flowing on the hasty instance").await;
    answered(&patients, 6, "requests flowing on the patient instance").await;

    let killed = Instant::now();
    sentinels.kill_primary();
    sentinels.wait_failover().await;
    let promoted = killed.elapsed();
    let (waited, first) = until_admitted(&reject, KEY_B).await;
    let recovered = promoted + waited;
    let (_, patient_first) = until_admitted(&patient, KEY_B).await;
    let patient_back = Instant::now();
    answered(&patients, 12, "requests after the switch").await;
    stop.store(true, Ordering::SeqCst);
    let mut rejected = collect(rejecting).await;
    rejected.push(first);
    let mut waited_out = collect(waiting).await;
    waited_out.push(patient_first);
    assert!(statuses(&rejected).contains(&503));
    let after: Vec<u16> = waited_out
        .iter()
        .filter(|o| o.sent >= patient_back)
        .map(|o| o.status)
        .collect();
    assert!(after.len() >= 10, "{after:?}");
    assert!(after.iter().all(|s| *s == 200), "{after:?}");
    eventually(WITHIN, "ready on the new primary", async || {
        reject.status("/readyz").await == 200
    })
    .await;

    // The budget lives on the new primary, with what the old one had passed
    // on: nothing twice, and at most the requests in flight at the crash
    // lost (as on a cluster, above).
    patient.settled(KEY_B).await;
    let used = patient.used(KEY_B, "tokens_per_day").await;
    let reported = charged(&rejected) + charged(&waited_out);
    let lost_at_most = 4 * first.tokens;
    eprintln!(
        "sentinel failover: replica promoted {promoted:?} after the kill, Iris admitting again \
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
    let config = with_store(&config, &store_toml(&url, "iris", PATIENT));
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
