//! After the first byte nothing is retried: a stream whose upstream dies,
//! stalls or ends without `[DONE]` ends with one `upstream_stream_interrupted`
//! event and no `[DONE]`, and the client is charged for what was generated.

use std::time::Duration;

use super::{Config, Iris, eventually, farm, stream};
use crate::support::mock_upstream::Fault;
use crate::support::{KEY_A, MockUpstream, o200k};

/// Two deployments, `a` first: a retry after the first byte would reach `b`.
async fn setup(name: &str, keys: &str) -> (MockUpstream, MockUpstream, Iris) {
    let [a, b] = farm().await;
    let (first, second) = (format!("{name}-a"), format!("{name}-b"));
    let iris = Config::new()
        .upstream(&first, &a.base_url(), keys)
        .upstream(&second, &b.base_url(), keys)
        .model(name, &[(&first, ""), (&second, "priority = 1")])
        .routing("backoff_ms = 1")
        .start()
        .await;
    (a, b, iris)
}

/// What client `a` was charged today, once its requests are settled.
async fn charged(iris: &Iris) -> u64 {
    iris.settled(KEY_A).await;
    iris.used(KEY_A, "tokens_per_day").await
}

#[tokio::test]
async fn a_stream_that_dies_ends_with_one_error_event_and_is_not_retried() {
    let (a, b, iris) = setup("stdie", "").await;
    a.fail_next(1, Fault::DieAfter(2));
    let reply = stream(&iris, "stdie").await;
    reply.assert_interrupted(2);
    assert_eq!((reply.upstream(), reply.attempts()), ("stdie-a", 1));
    assert_eq!(a.requests(), 1);
    assert_eq!(b.requests(), 0, "no retry once a byte reached the client");

    // Charged for what was generated: the prompt and two words, counted as
    // OpenAI's tokenizer counts them; not the reservation (4096 completion
    // tokens) and not nothing.
    assert_eq!(charged(&iris).await, o200k::SAY_HELLO + o200k::WORDS[2]);

    // The next request is served normally.
    let reply = stream(&iris, "stdie").await;
    assert!(reply.text.ends_with("data: [DONE]\n\n"), "{}", reply.text);
}

#[tokio::test]
async fn a_stream_that_stalls_is_interrupted_after_the_upstream_timeout() {
    let (a, b, iris) = setup("ststall", "timeout_ms = 1000").await;
    a.fail_next(1, Fault::StallAfter(2));
    let reply = stream(&iris, "ststall").await;
    reply.assert_interrupted(2);
    assert!(
        reply.elapsed >= Duration::from_millis(900),
        "silence is waited for timeout_ms: {:?}",
        reply.elapsed
    );
    assert_eq!((a.requests(), b.requests()), (1, 0));
    eventually("the stalled upstream request is cancelled", || async {
        a.cancelled_streams() == 1
    })
    .await;
    let used = charged(&iris).await;
    assert!(used > 0 && used < 1000, "charged {used}");
}

#[tokio::test]
async fn a_stream_that_ends_without_done_or_finish_is_interrupted() {
    let (a, b, iris) = setup("stvanish", "").await;
    a.fail_next(1, Fault::EndWithoutDone(3));
    let reply = stream(&iris, "stvanish").await;
    reply.assert_interrupted(3);
    assert_eq!((a.requests(), b.requests()), (1, 0));
}

#[tokio::test]
async fn a_stream_that_dies_at_once_is_interrupted_too() {
    let (a, b, iris) = setup("stdie0", "").await;
    // Only the role chunk went out: it reached the client, so still no retry.
    a.fail_next(1, Fault::DieAfter(0));
    let reply = stream(&iris, "stdie0").await;
    reply.assert_interrupted(0);
    assert_eq!((a.requests(), b.requests()), (1, 0));
}
