//! Upstream pacing: `requests_per_minute`, `tokens_per_minute` and
//! `max_concurrent` on an upstream are Iris's own limits under the
//! provider's; a deployment without room is skipped, then requests wait up
//! to `max_queue_ms` (admitted round-robin across clients), then 429
//! `upstream_rate_limited` with `Retry-After`.

use std::time::{Duration, Instant};

use futures_util::StreamExt as _;

use super::{Config, Reply, ask, capped_body, chat, eventually, farm, metric};
use crate::support::{KEY_A, KEY_B, chat_body, o200k};

/// Asserts Iris's own 429 for a model without upstream room.
#[track_caller]
fn assert_no_room(reply: &Reply) {
    assert_eq!(reply.status, 429, "{}", reply.text);
    assert_eq!(reply.error()["code"], "upstream_rate_limited");
    let retry_after: u64 = reply
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Retry-After in seconds: {:?}", reply.headers));
    assert!(
        (1..=60).contains(&retry_after),
        "Retry-After: {retry_after}"
    );
}

#[tokio::test]
async fn requests_per_minute_paces_the_upstream() {
    let [a] = farm().await;
    let iris = Config::new()
        .upstream("pacerpm-a", &a.base_url(), "requests_per_minute = 5")
        .single("pacerpm", "pacerpm-a")
        .start()
        .await;
    let mut admitted = 0;
    for _ in 0..12 {
        let reply = chat(&iris, "pacerpm").await;
        if reply.status == 200 {
            admitted += 1;
        } else {
            assert_no_room(&reply);
        }
    }
    assert_eq!(admitted, 5, "a burst of the limit, like a client's budget");
    assert_eq!(a.requests(), 5, "the upstream saw no more than its limit");
}

#[tokio::test]
async fn a_deployment_without_room_is_skipped() {
    let [a, b] = farm().await;
    let iris = Config::new()
        .upstream("paceskip-a", &a.base_url(), "requests_per_minute = 3")
        .upstream("paceskip-b", &b.base_url(), "requests_per_minute = 3")
        .model("paceskip", &[("paceskip-a", ""), ("paceskip-b", "")])
        .start()
        .await;
    let mut admitted = 0;
    for _ in 0..10 {
        let reply = chat(&iris, "paceskip").await;
        if reply.status == 200 {
            assert_eq!(
                reply.attempts(),
                1,
                "no attempt on a deployment without room"
            );
            admitted += 1;
        } else {
            assert_no_room(&reply);
        }
    }
    assert_eq!(admitted, 6);
    assert_eq!((a.requests(), b.requests()), (3, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_caps_the_requests_in_flight() {
    let [a] = farm().await;
    let iris = Config::new()
        .upstream(
            "pacecc-a",
            &a.base_url(),
            "max_concurrent = 2\ntimeout_ms = 10000",
        )
        .single("pacecc", "pacecc-a")
        .start()
        .await;
    let body = chat_body("pacecc");
    let slow = [("x-mock-delay-ms", "3000")];
    let replies: Vec<Reply> =
        futures_util::future::join_all((0..6).map(|_| ask(&iris, KEY_A, &body, &slow))).await;
    let admitted = replies.iter().filter(|r| r.status == 200).count();
    for reply in replies.iter().filter(|r| r.status != 200) {
        assert_no_room(reply);
        assert!(
            reply.elapsed < Duration::from_millis(2500),
            "refused at once"
        );
    }
    assert_eq!(admitted, 2);
    assert_eq!(a.requests(), 2);
    assert!(a.peak_in_flight() <= 2);
    // The slots are released: the next request goes through.
    assert_eq!(chat(&iris, "pacecc").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_per_minute_reserves_then_settles() {
    let [a] = farm().await;
    let iris = Config::new()
        .upstream(
            "pacetpm-a",
            &a.base_url(),
            "tokens_per_minute = 1000\ntimeout_ms = 10000",
        )
        .single("pacetpm", "pacetpm-a")
        .start()
        .await;
    let body = capped_body("pacetpm", 400);
    // The prompt as OpenAI's tokenizer counts it, and the cap.
    let reserved = o200k::SAY_HELLO + 400;
    assert!(2 * reserved <= 1000 && 3 * reserved > 1000, "{reserved}");
    let slow = [("x-mock-delay-ms", "2000")];
    let replies: Vec<Reply> =
        futures_util::future::join_all((0..5).map(|_| ask(&iris, KEY_A, &body, &slow))).await;
    let admitted = replies.iter().filter(|r| r.status == 200).count();
    for reply in replies.iter().filter(|r| r.status != 200) {
        assert_no_room(reply);
    }
    assert_eq!(admitted, 2, "two reservations of {reserved} fit in 1000");
    // Settled with the upstream's usage (a few dozen tokens each), the
    // reservations are given back: another one fits again. (Kept, they would
    // leave 180 tokens, and refill takes some 14 s to make up the 410.)
    iris.settled(KEY_A).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let reply = ask(&iris, KEY_A, &body, &[]).await;
        if reply.status == 200 {
            break;
        }
        assert_no_room(&reply);
        assert!(
            Instant::now() < deadline,
            "the upstream's reservations were never settled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(a.requests(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_request_waits_for_room_up_to_max_queue_ms() {
    let [a] = farm().await;
    let iris = Config::new()
        .upstream(
            "paceq-a",
            &a.base_url(),
            "max_concurrent = 1\ntimeout_ms = 10000",
        )
        .single("paceq", "paceq-a")
        .routing("max_queue_ms = 1000")
        .start()
        .await;
    let body = chat_body("paceq");

    // Room within max_queue_ms: the waiting request is answered.
    let (first, second) = tokio::join!(
        ask(&iris, KEY_A, &body, &[("x-mock-delay-ms", "300")]),
        async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            ask(&iris, KEY_B, &body, &[]).await
        }
    );
    assert_eq!((first.status, second.status), (200, 200), "{}", second.text);

    // No room within max_queue_ms: 429 after waiting.
    let (long, refused) = tokio::join!(
        ask(&iris, KEY_A, &body, &[("x-mock-delay-ms", "4000")]),
        async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            ask(&iris, KEY_B, &body, &[]).await
        }
    );
    assert_eq!(long.status, 200);
    assert_no_room(&refused);
    assert!(
        refused.elapsed >= Duration::from_millis(900),
        "waited max_queue_ms first: {:?}",
        refused.elapsed
    );
    assert_eq!(a.requests(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_admits_clients_round_robin() {
    let [a] = farm().await;
    let iris = Config::new()
        .upstream(
            "pacefair-a",
            &a.base_url(),
            "max_concurrent = 1\ntimeout_ms = 30000",
        )
        .single("pacefair", "pacefair-a")
        .routing("max_queue_ms = 30000")
        .start()
        .await;
    let body = chat_body("pacefair");
    let queued = || metric(&iris, "iris_upstream_queue_length", &["model=\"pacefair\""]);

    // Client a floods: one request at the upstream, nine waiting.
    let flood = futures_util::stream::iter(0..10)
        .map(|_| {
            ask(
                &iris,
                KEY_A,
                &body,
                &[("x-mock-delay-ms", "300"), ("x-test-client", "a")],
            )
        })
        .buffer_unordered(10)
        .collect::<Vec<Reply>>();
    let late = async {
        eventually("client a's requests are queued", || async {
            queued().await >= 8.0
        })
        .await;
        ask(
            &iris,
            KEY_B,
            &body,
            &[("x-mock-delay-ms", "300"), ("x-test-client", "b")],
        )
        .await
    };
    let (flood, late) = tokio::join!(flood, late);
    assert!(flood.iter().all(|r| r.status == 200));
    assert_eq!(late.status, 200, "{}", late.text);

    // The order in which the upstream saw them: b's request came in among
    // the first few, not behind every one of a's.
    let order: Vec<String> = a
        .received()
        .iter()
        .map(|r| r.headers["x-test-client"].to_str().unwrap().to_owned())
        .collect();
    let position = order.iter().position(|c| c == "b").unwrap();
    assert!(
        position <= 3,
        "b admitted at {position} of {}: {order:?}",
        order.len()
    );
    assert!(
        metric(
            &iris,
            "iris_upstream_queue_wait_seconds_count",
            &["model=\"pacefair\""]
        )
        .await
            >= 9.0
    );
    assert_eq!(queued().await, 0.0, "the queue is empty again");
}
