//! The budget service end to end over the memory store, with tokio's clock
//! paused so minute windows and calendar boundaries are crossed exactly.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::budget::store::SqliteStore;
use crate::budget::window::NANOS_PER_SEC;
use crate::catalog::Client;
use crate::error::{ApiError, ErrorCode, rate_limit_headers};
use crate::keys::KeyHash;
use crate::openai::stream::Usage;

/// 2024-12-31T23:59:00Z.
const NEW_YEARS_EVE: Duration = Duration::from_secs(1_735_689_540);

fn client(budget: &str) -> Arc<Client> {
    let config = crate::config::parse(
        &format!(
            "[[clients]]\nname = \"c\"\nkey = \"{}\"\n[clients.budget]\n{budget}\n",
            KeyHash::of("k")
        ),
        &|_| None,
    )
    .expect("config");
    Arc::clone(&config.catalog.clients()[0])
}

/// Reserves for `client` and renders a refusal as the client would get it,
/// so these tests cover the 429s' headers too.
trait ReserveFor {
    async fn reserve_for(
        &self,
        client: &Client,
        estimate: Estimate,
    ) -> Result<Reservation, ApiError>;
}

impl ReserveFor for Budgets {
    async fn reserve_for(
        &self,
        client: &Client,
        estimate: Estimate,
    ) -> Result<Reservation, ApiError> {
        self.reserve(Claim {
            client: &client.name,
            limits: &client.budget,
            team: None,
            model: "m",
            estimate,
            price: None,
        })
        .await
        .map_err(ApiError::from)
    }
}

fn budgets(start: Duration) -> Budgets {
    Budgets::new(
        Arc::new(MemoryStore::new()),
        Clock::starting_at(start),
        OnUnavailable::Reject,
    )
}

fn cost(total: u64) -> Estimate {
    Estimate {
        prompt: total / 2,
        completion: total - total / 2,
    }
}

fn header<'a>(error: &'a ApiError, name: &str) -> Option<&'a str> {
    error.headers.as_ref()?.get(name)?.to_str().ok()
}

async fn used(budgets: &Budgets, client: &Client, window: Window) -> u64 {
    budgets
        .snapshot(&Account::client(Arc::clone(&client.name)), &client.budget)
        .await
        .expect("snapshot")
        .get(window)
        .used
}

#[tokio::test(start_paused = true)]
async fn minute_window_refuses_then_admits_after_retry_after() {
    let budgets = budgets(NEW_YEARS_EVE - Duration::from_secs(3600));
    let client = client("tokens_per_minute = 1000");
    budgets
        .reserve_for(&client, cost(600))
        .await
        .expect("fits")
        .charge(Charge::tokens(600));
    let error = budgets
        .reserve_for(&client, cost(600))
        .await
        .err()
        .expect("over the minute");
    assert_eq!(error.status, 429);
    assert_eq!(error.code.as_str(), "rate_limit_exceeded");
    // 200 of 1000 per minute drain in 12 s.
    assert_eq!(header(&error, "retry-after"), Some("12"));
    assert_eq!(header(&error, "retry-after-ms"), Some("12000"));
    assert_eq!(header(&error, "x-should-retry"), None);
    assert_eq!(header(&error, "x-ratelimit-limit-tokens"), Some("1000"));
    assert_eq!(header(&error, "x-ratelimit-remaining-tokens"), Some("400"));
    assert_eq!(header(&error, "x-ratelimit-reset-tokens"), Some("36s"));

    tokio::time::advance(Duration::from_millis(11_999)).await;
    assert!(budgets.reserve_for(&client, cost(600)).await.is_err());
    tokio::time::advance(Duration::from_millis(1)).await;
    let reservation = budgets
        .reserve_for(&client, cost(600))
        .await
        .expect("drained");
    assert_eq!(
        rate_limit_headers(reservation.snapshot())["x-ratelimit-remaining-tokens"],
        "0"
    );
    assert_eq!(
        rate_limit_headers(reservation.snapshot())["x-ratelimit-reset-tokens"],
        "1m0s"
    );
}

#[tokio::test(start_paused = true)]
async fn the_day_ends_at_midnight_utc_and_the_month_with_the_year() {
    let budgets = budgets(NEW_YEARS_EVE);
    let client = client("tokens_per_day = 100\ntokens_per_month = 1000");
    budgets
        .reserve_for(&client, cost(90))
        .await
        .expect("fits")
        .charge(Charge::tokens(90));
    let error = budgets
        .reserve_for(&client, cost(20))
        .await
        .err()
        .expect("day spent");
    assert_eq!(error.code.as_str(), "insufficient_quota");
    assert_eq!(header(&error, "x-should-retry"), Some("false"));
    assert_eq!(header(&error, "retry-after"), Some("60"), "until midnight");
    assert!(
        error.message.contains("2025-01-01T00:00:00Z"),
        "{}",
        error.message
    );
    assert_eq!(header(&error, "x-ratelimit-remaining-tokens"), Some("10"));

    tokio::time::advance(Duration::from_secs(60)).await;
    assert_eq!(used(&budgets, &client, Window::TokensPerDay).await, 0);
    assert_eq!(used(&budgets, &client, Window::TokensPerMonth).await, 0);
    budgets
        .reserve_for(&client, cost(20))
        .await
        .expect("a new day and a new month")
        .charge(Charge::tokens(20));
    assert_eq!(used(&budgets, &client, Window::TokensPerMonth).await, 20);
}

#[tokio::test(start_paused = true)]
async fn february_ends_on_the_29th_in_a_leap_year() {
    // 2024-02-28T23:00:00Z.
    let budgets = budgets(Duration::from_secs(1_709_161_200));
    let client = client("tokens_per_month = 100");
    budgets
        .reserve_for(&client, cost(100))
        .await
        .expect("fits")
        .charge(Charge::tokens(100));
    tokio::time::advance(Duration::from_secs(3600)).await; // Feb 29, 00:00
    let error = budgets
        .reserve_for(&client, cost(1))
        .await
        .err()
        .expect("still February");
    assert_eq!(
        header(&error, "retry-after"),
        Some("86400"),
        "until March 1"
    );
    tokio::time::advance(Duration::from_secs(86_400)).await;
    assert!(budgets.reserve_for(&client, cost(100)).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_request_larger_than_the_window_is_insufficient_quota_at_once() {
    let budgets = budgets(NEW_YEARS_EVE);
    let client = client("tokens_per_minute = 100000\ntokens_per_day = 1000");
    let error = budgets
        .reserve_for(&client, cost(5000))
        .await
        .err()
        .expect("too large");
    assert_eq!(error.code.as_str(), "insufficient_quota");
    assert_eq!(header(&error, "x-should-retry"), Some("false"));
    assert_eq!(header(&error, "retry-after"), None, "waiting never helps");
    assert!(
        error.message.contains("tokens_per_day"),
        "{}",
        error.message
    );
    assert_eq!(used(&budgets, &client, Window::TokensPerDay).await, 0);
}

#[tokio::test(start_paused = true)]
async fn dropping_a_reservation_releases_it() {
    let budgets = budgets(NEW_YEARS_EVE);
    let client = client("tokens_per_day = 1000\nmax_concurrent = 1");
    let reservation = budgets.reserve_for(&client, cost(800)).await.expect("fits");
    assert_eq!(used(&budgets, &client, Window::TokensPerDay).await, 800);
    let error = budgets
        .reserve_for(&client, cost(1))
        .await
        .err()
        .expect("one at a time");
    assert_eq!(error.code.as_str(), "rate_limit_exceeded");
    assert_eq!(header(&error, "retry-after"), Some("1"));
    drop(reservation);
    assert_eq!(used(&budgets, &client, Window::TokensPerDay).await, 0);
    assert_eq!(used(&budgets, &client, Window::MaxConcurrent).await, 0);
}

#[tokio::test(start_paused = true)]
async fn finish_settles_by_reported_usage_or_by_estimate() {
    let budgets = budgets(NEW_YEARS_EVE);
    let client = client("tokens_per_day = 100000");
    let estimate = Estimate {
        prompt: 50,
        completion: 1000,
    };

    let reported = Outcome {
        complete: true,
        usage: Some(Usage {
            prompt_tokens: 40,
            completion_tokens: 7,
            total_tokens: 47,
            ..Usage::default()
        }),
        generated: "ignored when usage came".into(),
        finished: true,
        error_code: None,
    };
    drop(
        budgets
            .reserve_for(&client, estimate)
            .await
            .expect("fits")
            .settle(reported, true, |_| {}),
    );
    assert_eq!(used(&budgets, &client, Window::TokensPerDay).await, 47);

    // The client hung up after some text and no usage: prompt estimate + text.
    let hung_up = Outcome {
        complete: false,
        usage: None,
        generated: "Hello, world!".into(),
        finished: false,
        error_code: None,
    };
    drop(
        budgets
            .reserve_for(&client, estimate)
            .await
            .expect("fits")
            .settle(hung_up, true, |_| {}),
    );
    assert_eq!(
        used(&budgets, &client, Window::TokensPerDay).await,
        47 + 50 + 4
    );

    // A long text is counted off the async threads, and still charged.
    let long = "word ".repeat(1000);
    let long_tokens = estimate::count_tokens(&long);
    drop(
        budgets
            .reserve_for(&client, estimate)
            .await
            .expect("fits")
            .settle(
                Outcome {
                    complete: false,
                    usage: None,
                    generated: long,
                    finished: false,
                    error_code: None,
                },
                true,
                |_| {},
            ),
    );
    let expected = 47 + 50 + 4 + 50 + long_tokens;
    for _ in 0..400 {
        if used(&budgets, &client, Window::TokensPerDay).await == expected {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(
        used(&budgets, &client, Window::TokensPerDay).await,
        expected
    );

    // An upstream error without usage costs nothing.
    drop(
        budgets
            .reserve_for(&client, estimate)
            .await
            .expect("fits")
            .settle(Outcome::default(), false, |_| {}),
    );
    assert_eq!(
        used(&budgets, &client, Window::TokensPerDay).await,
        expected
    );
    assert_eq!(used(&budgets, &client, Window::MaxConcurrent).await, 0);
}

#[tokio::test(start_paused = true)]
async fn headers_name_the_tightest_token_window() {
    let budgets = budgets(NEW_YEARS_EVE - Duration::from_secs(3540)); // 23:00
    let client =
        client("requests_per_minute = 10\ntokens_per_minute = 1000\ntokens_per_day = 1500\n");
    let first = budgets.reserve_for(&client, cost(100)).await.expect("fits");
    let headers = rate_limit_headers(first.snapshot());
    assert_eq!(
        headers["x-ratelimit-limit-tokens"], "1000",
        "minute has least left"
    );
    assert_eq!(headers["x-ratelimit-remaining-tokens"], "900");
    assert_eq!(headers["x-ratelimit-reset-tokens"], "6s");
    assert_eq!(headers["x-ratelimit-limit-requests"], "10");
    assert_eq!(headers["x-ratelimit-remaining-requests"], "9");
    assert_eq!(headers["x-ratelimit-reset-requests"], "6s");
    first.charge(Charge::tokens(1000));
    tokio::time::advance(Duration::from_secs(60)).await;
    let second = budgets.reserve_for(&client, cost(100)).await.expect("fits");
    // Day: 1500 - 1000 settled - 100 reserved = 400 left, less than the minute's 900.
    assert_eq!(
        rate_limit_headers(second.snapshot())["x-ratelimit-limit-tokens"],
        "1500"
    );
    assert_eq!(
        rate_limit_headers(second.snapshot())["x-ratelimit-remaining-tokens"],
        "400"
    );
    assert_eq!(
        rate_limit_headers(second.snapshot())["x-ratelimit-reset-tokens"],
        "59m0s"
    );
}

#[test]
fn durations_use_openais_format() {
    let ms = 1_000_000;
    assert_eq!(duration_string(0), "0s");
    assert_eq!(duration_string(20 * ms), "20ms");
    assert_eq!(duration_string(1), "1ms");
    assert_eq!(duration_string(1500 * ms), "1.5s");
    assert_eq!(duration_string(1020 * ms), "1.02s");
    assert_eq!(duration_string(360_000 * ms), "6m0s");
    assert_eq!(duration_string(48_005_300 * ms), "13h20m5.3s");
    assert_eq!(duration_string(1005 * ms), "1.005s");
    assert_eq!(duration_string(3_600_000 * ms), "1h0m0s");
}

/// A store that never answers.
struct Down;

impl Store for Down {
    fn reserve(&self, _: &Parties, _: Charge, _: u64) -> StoreFuture<store::Reserved> {
        Box::pin(async { Err(StoreError("connection refused".into())) })
    }
    fn settle(&self, _: &Parties, _: Hold, _: Charge, _: u64) -> StoreFuture<()> {
        Box::pin(async { Err(StoreError("connection refused".into())) })
    }
    fn snapshot(&self, _: &Account, _: &Limits, _: u64) -> StoreFuture<Snapshot> {
        Box::pin(async { Err(StoreError("connection refused".into())) })
    }
    fn health(&self) -> StoreFuture<()> {
        Box::pin(async { Err(StoreError("connection refused".into())) })
    }
    fn flush(&self) -> StoreFuture<()> {
        Box::pin(async { Ok(()) })
    }
}

#[tokio::test]
async fn an_unavailable_store_answers_503_or_admits_as_configured() {
    let client = client("tokens_per_day = 10");
    let reject = Budgets::new(Arc::new(Down), Clock::system(), OnUnavailable::Reject);
    let error = reject
        .reserve_for(&client, cost(1))
        .await
        .err()
        .expect("503");
    assert_eq!(
        (error.status.as_u16(), error.code),
        (503, ErrorCode::StoreUnavailable)
    );
    assert!(reject.health().await.is_err());
    let allow = Budgets::new(Arc::new(Down), Clock::system(), OnUnavailable::Allow);
    allow
        .reserve_for(&client, cost(1))
        .await
        .expect("admitted")
        .charge(Charge::tokens(1));
}

/// An upstream's pacing counted locally while the store is down is counted
/// as that upstream's, never as a client's (it once was, as a client named
/// after the upstream's storage key).
#[tokio::test]
async fn a_pacing_fallback_is_counted_as_the_upstreams_not_a_clients() {
    let metrics = crate::metrics::Metrics::install();
    let budgets = Budgets::new(Arc::new(Down), Clock::system(), OnUnavailable::Allow);
    let pacing = Limits {
        requests_per_minute: Some(10),
        ..Limits::default()
    };
    let room = budgets
        .reserve_room("paced-upstream", &pacing, cost(1))
        .await
        .expect("counted locally")
        .expect("paced");
    drop(room);
    let rendered = metrics.render();
    let lines: Vec<&str> = rendered
        .lines()
        .filter(|line| line.contains("paced-upstream"))
        .collect();
    assert_eq!(
        lines,
        ["iris_upstream_pacing_fallback_total{upstream=\"paced-upstream\"} 1"],
        "counted once, as the upstream's pacing, under no client"
    );
}

/// A memory store that can be switched off, like a Redis that goes away and
/// comes back.
struct Flaky {
    down: std::sync::atomic::AtomicBool,
    store: MemoryStore,
}

impl Flaky {
    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            Err(StoreError("connection refused".into()))
        } else {
            Ok(())
        }
    }
}

impl Store for Flaky {
    fn reserve(&self, parties: &Parties, charge: Charge, now: u64) -> StoreFuture<store::Reserved> {
        let result = self
            .check()
            .map(|()| self.store.reserve_now(parties, charge, now));
        Box::pin(std::future::ready(result))
    }
    fn settle(&self, parties: &Parties, hold: Hold, actual: Charge, now: u64) -> StoreFuture<()> {
        let result = self
            .check()
            .map(|()| self.store.settle_now(parties, &hold, actual, now));
        Box::pin(std::future::ready(result))
    }
    fn snapshot(&self, account: &Account, limits: &Limits, now: u64) -> StoreFuture<Snapshot> {
        let result = self
            .check()
            .map(|()| self.store.snapshot_now(account, limits, now));
        Box::pin(std::future::ready(result))
    }
    fn health(&self) -> StoreFuture<()> {
        Box::pin(std::future::ready(self.check()))
    }
    fn flush(&self) -> StoreFuture<()> {
        Box::pin(std::future::ready(Ok(())))
    }
}

#[tokio::test]
async fn allowed_through_an_outage_requests_are_counted_locally_then_the_store_again() {
    let flaky = Arc::new(Flaky {
        down: true.into(),
        store: MemoryStore::new(),
    });
    let budgets = Budgets::new(
        Arc::clone(&flaky) as Arc<dyn Store>,
        Clock::system(),
        OnUnavailable::Allow,
    );
    let client = client("tokens_per_day = 100\nmax_concurrent = 5");

    // Down: admitted against this instance's own count, which still limits.
    let during = budgets
        .reserve_for(&client, cost(60))
        .await
        .expect("admitted");
    assert_eq!(
        rate_limit_headers(during.snapshot())
            .get("x-ratelimit-remaining-tokens")
            .map(|v| v.to_str().ok()),
        Some(Some("40")),
        "headers from the local count"
    );
    let error = budgets
        .reserve_for(&client, cost(60))
        .await
        .err()
        .expect("over the local count");
    assert_eq!(error.code.as_str(), "insufficient_quota");

    // Back: the store decides again, and knows nothing of the outage.
    flaky.down.store(false, std::sync::atomic::Ordering::SeqCst);
    let after = budgets.reserve_for(&client, cost(60)).await.expect("fits");
    let in_store = |window| {
        flaky
            .store
            .snapshot_now(
                &Account::client("c"),
                &client.budget,
                budgets.inner.clock.now(),
            )
            .get(window)
            .used
    };
    assert_eq!(in_store(Window::TokensPerDay), 60);
    assert_eq!(in_store(Window::MaxConcurrent), 1);

    // Each reservation settles where it was made.
    during.charge(Charge::tokens(10));
    assert_eq!(
        in_store(Window::MaxConcurrent),
        1,
        "the local one settled locally"
    );
    let local = budgets.inner.local.snapshot_now(
        &Account::client("c"),
        &client.budget,
        budgets.inner.clock.now(),
    );
    assert_eq!(local.get(Window::TokensPerDay).used, 10);
    assert_eq!(local.get(Window::MaxConcurrent).used, 0);
    after.charge(Charge::tokens(20));
    assert_eq!(in_store(Window::TokensPerDay), 20);
    assert_eq!(in_store(Window::MaxConcurrent), 0);
}

/// Times reserve + settle on the embedded store's hot path (the in-memory
/// state; SQLite writes happen in the background). Run with
/// `cargo test --release --lib budget_hot_path -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "benchmark"]
async fn budget_hot_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(&dir.path().join("bench.db")).expect("open");
    store.spawn_flusher(store::FLUSH_EVERY);
    let budgets = Budgets::new(store, Clock::system(), OnUnavailable::Reject);
    let client = client(
        "requests_per_minute = 1000000000\ntokens_per_minute = 1000000000000\n\
         tokens_per_day = 1000000000000\ntokens_per_month = 1000000000000\nmax_concurrent = 8",
    );
    let mut samples = Vec::with_capacity(100_000);
    for _ in 0..100_000 {
        let started = std::time::Instant::now();
        let reservation = budgets
            .reserve_for(&client, cost(1000))
            .await
            .expect("fits");
        reservation.charge(Charge::tokens(900));
        samples.push(started.elapsed());
    }
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize];
    println!(
        "Budgets::reserve + settle (headers included) over 100k: p50 {:?}, p90 {:?}, p99 {:?}, max {:?}",
        at(0.5),
        at(0.9),
        at(0.99),
        at(1.0)
    );

    // The store's part alone.
    let memory = MemoryStore::new();
    let parties = store::Party::alone(Account::client("c"), client.budget);
    let started = std::time::Instant::now();
    for i in 0..100_000u64 {
        let now = 1_735_689_540 * NANOS_PER_SEC + i * 1000;
        let reserved = memory.reserve_now(&parties, Charge::tokens(1000), now);
        let hold = reserved.outcome.expect("fits");
        memory.settle_now(&parties, &hold, Charge::tokens(900), now);
    }
    println!(
        "store reserve + settle alone: {:?} per pair",
        started.elapsed() / 100_000
    );

    let prompt = "The quick brown fox jumps over the lazy dog. ".repeat(45); // ~2 KB
    let started = std::time::Instant::now();
    let mut tokens = 0;
    for _ in 0..1000 {
        tokens += estimate::count_tokens(&prompt);
    }
    let per = started.elapsed() / 1000;
    println!(
        "tokenizing a {} byte prompt ({} tokens): {per:?}",
        prompt.len(),
        tokens / 1000
    );
    assert!(at(0.5) < Duration::from_millis(1));
}

/// The spend log's token counts come from `settle`'s `then`: what the
/// budget was charged, whether the settlement ran inline or on the blocking
/// pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settle_reports_what_was_charged() {
    let budgets = budgets(NEW_YEARS_EVE);
    let client = client("tokens_per_day = 1000000");
    let estimate = Estimate {
        prompt: 50,
        completion: 1000,
    };
    let settled = |outcome: Outcome, upstream_ok: bool| {
        let budgets = budgets.clone();
        let client = Arc::clone(&client);
        async move {
            let (tx, rx) = tokio::sync::oneshot::channel();
            drop(
                budgets
                    .reserve_for(&client, estimate)
                    .await
                    .expect("fits")
                    .settle(outcome, upstream_ok, move |charged| {
                        let _ = tx.send(charged);
                    }),
            );
            rx.await.expect("then runs")
        }
    };
    let reported = Outcome {
        complete: true,
        usage: Some(Usage {
            prompt_tokens: 40,
            completion_tokens: 7,
            total_tokens: 50,
            ..Usage::default()
        }),
        ..Outcome::default()
    };
    assert_eq!(
        settled(reported, true).await,
        Charged {
            prompt: 40,
            completion: 7,
            total: 50,
            ..Charged::default()
        },
        "the upstream's total, where it reports more than the sum"
    );
    let long = "word ".repeat(1000);
    let counted = estimate::count_tokens(&long);
    let offloaded = Outcome {
        generated: long,
        ..Outcome::default()
    };
    assert_eq!(
        settled(offloaded, true).await,
        Charged {
            prompt: 50,
            completion: counted,
            total: 50 + counted,
            ..Charged::default()
        }
    );
    assert_eq!(
        settled(Outcome::default(), false).await,
        Charged::default(),
        "an upstream error without usage is charged nothing"
    );
    let before = used(&budgets, &client, Window::TokensPerDay).await;
    assert_eq!(before, 50 + 50 + counted);
}

/// A prompt not tokenized at reservation (no token limit applied) is counted
/// exactly when the settlement has no usage from the upstream, and not at all
/// when it has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncounted_prompt_is_counted_only_when_settling_without_usage() {
    let budgets = budgets(NEW_YEARS_EVE);
    let client = client("tokens_per_day = 1000000");
    let body = bytes::Bytes::from_static(
        br#"{"model":"m","messages":[{"role":"user","content":"Hello, world! Hello again."}]}"#,
    );
    let request = crate::openai::chat::ChatRequest::parse(&body).expect("a chat request");
    let exact = estimate::prompt_tokens(&request);
    let rough = estimate::estimate_counting(body.len(), &request, 10, false);
    assert_eq!(rough.prompt, estimate::rough_prompt(body.len()));
    assert_ne!(rough.prompt, exact, "the test needs the two to differ");

    let settled = |usage: Option<Usage>| {
        let (budgets, client, body) = (budgets.clone(), Arc::clone(&client), body.clone());
        async move {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let mut reservation = budgets.reserve_for(&client, rough).await.expect("fits");
            reservation.count_prompt_later(body, RequestLimits::DEFAULT);
            let outcome = Outcome {
                complete: false,
                usage,
                generated: "Hello, world!".into(),
                finished: false,
                error_code: None,
            };
            drop(reservation.settle(outcome, true, move |charged| {
                let _ = tx.send(charged);
            }));
            rx.await.expect("settled")
        }
    };
    let without_usage = settled(None).await;
    assert_eq!(without_usage.prompt, exact);
    assert_eq!(without_usage.completion, 4);
    let reported = Usage {
        prompt_tokens: 40,
        completion_tokens: 7,
        total_tokens: 47,
        ..Usage::default()
    };
    assert_eq!(settled(Some(reported)).await.prompt, 40);
}
