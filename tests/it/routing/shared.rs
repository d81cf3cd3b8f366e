//! Two Iris instances on one Redis share cooldowns and upstream pacing.
//!
//! Without Redis these tests say they were skipped and pass, unless
//! `IRIS_REQUIRE_REDIS=1` (see tests/it/support/redis.rs).

use std::time::Duration;

use super::{Config, assert_answered, chat, farm};
use crate::support::mock_upstream::Fault;
use crate::support::redis::SharedRedis;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cooldown_seen_by_one_instance_is_skipped_by_the_other() {
    let Some(redis) = SharedRedis::get().await else {
        return;
    };
    let [a, b] = farm().await;
    let config = Config::new()
        .store(&redis.store_toml(""))
        .upstream("shcd-a", &a.base_url(), "")
        .upstream("shcd-b", &b.base_url(), "")
        .model("shcd", &[("shcd-a", ""), ("shcd-b", "priority = 1")])
        .routing("backoff_ms = 1\nallowed_fails = 1\ncooldown_ms = 30000");
    let one = config.start().await;
    let two = config.start().await;
    // Both prefer a while it is healthy.
    assert_answered(&chat(&one, "shcd").await, "shcd-a", 1);
    assert_answered(&chat(&two, "shcd").await, "shcd-a", 1);

    // a fails once, on instance one: cooling.
    a.fail_next(1, Fault::status(503));
    assert_answered(&chat(&one, "shcd").await, "shcd-b", 2);
    // a is healthy again, but cooling for 30 s; instance two, which never
    // saw it fail, skips it too (within about a second).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for _ in 0..5 {
        assert_answered(&chat(&two, "shcd").await, "shcd-b", 1);
    }
    assert_eq!(a.requests(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_pacing_holds_across_instances() {
    let Some(redis) = SharedRedis::get().await else {
        return;
    };
    let [a] = farm().await;
    let config = Config::new()
        .store(&redis.store_toml(""))
        .upstream("shrpm-a", &a.base_url(), "requests_per_minute = 4")
        .single("shrpm", "shrpm-a");
    let fleet = [config.start().await, config.start().await];
    let mut admitted = 0;
    for i in 0..10 {
        let reply = chat(&fleet[i % 2], "shrpm").await;
        match reply.status {
            200 => admitted += 1,
            429 => assert_eq!(reply.error()["code"], "upstream_rate_limited"),
            other => panic!("{other}: {}", reply.text),
        }
    }
    assert_eq!(admitted, 4, "one limit for both instances");
    assert_eq!(a.requests(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_concurrency_holds_across_instances() {
    let Some(redis) = SharedRedis::get().await else {
        return;
    };
    let [a] = farm().await;
    let config = Config::new()
        .store(&redis.store_toml(""))
        .upstream(
            "shcc-a",
            &a.base_url(),
            "max_concurrent = 2\ntimeout_ms = 10000",
        )
        .single("shcc", "shcc-a");
    let fleet = [config.start().await, config.start().await];
    let body = crate::support::chat_body("shcc");
    let slow = [("x-mock-delay-ms", "3000")];
    let replies = futures_util::future::join_all(
        (0..6).map(|i| super::ask(&fleet[i % 2], crate::support::KEY_A, &body, &slow)),
    )
    .await;
    let admitted = replies.iter().filter(|r| r.status == 200).count();
    assert_eq!(admitted, 2, "two slots across both instances");
    assert!(a.peak_in_flight() <= 2);
}
