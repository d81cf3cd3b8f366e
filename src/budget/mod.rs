//! Fair-usage budgets per client: reserve an estimate before forwarding,
//! settle with the upstream's reported usage when the response ends.
//!
//! Checking first and charging later would let concurrent requests
//! overspend many times over; a reservation charges every window at once,
//! atomically, and settlement only corrects it. [`Reservation`] is a guard:
//! dropped without settling (an error path, a client gone), it gives the
//! reservation back, and settling from a `Drop` finishes even though nobody
//! awaits it.
//!
//! - [`estimate`]: tokens a request may cost (tokenizer, images, caps)
//! - [`window`]: the windows' arithmetic (GCRA per minute, UTC day and month)
//! - [`store`]: where the state lives (memory, SQLite, Redis)
//! - [`report`]: `iris usage`

pub mod estimate;
pub mod report;
pub mod store;
pub mod window;

use std::path::PathBuf;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use crate::catalog::Client;
use crate::config::{BudgetConfig, OnUnavailable, StoreConfig, StoreKind};
use crate::error::ApiError;
use crate::openai::stream::Outcome;
use estimate::Estimate;
use store::{MemoryStore, RedisStore, Reserved, SqliteStore, Store, StoreError, StoreFuture};
use window::{Clock, Hold, NANOS_PER_SEC, Refusal, Snapshot, Window, WindowStatus};

/// The budget service: a store, a clock, and what to do when the store is down.
#[derive(Clone)]
pub struct Budgets {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    /// Where requests are counted while the store does not answer and
    /// `on_unavailable = "allow"`: this instance's count of the outage only
    /// (it starts from nothing and is not copied to the store afterwards),
    /// so each instance still holds a client to its limits meanwhile.
    local: MemoryStore,
    clock: Clock,
    on_unavailable: OnUnavailable,
}

impl Budgets {
    /// Opens the configured store (loading an SQLite file and starting its
    /// background writer) and warms the tokenizer.
    pub async fn open(config: &StoreConfig) -> Result<Self, String> {
        let store: Arc<dyn Store> = match config.kind {
            StoreKind::Memory => Arc::new(MemoryStore::new()),
            StoreKind::Sqlite => {
                let path = PathBuf::from(&config.path);
                let store = tokio::task::spawn_blocking(move || SqliteStore::open(&path))
                    .await
                    .map_err(|e| format!("store: {e}"))?
                    .map_err(|e| e.to_string())?;
                store.spawn_flusher(store::FLUSH_EVERY);
                store
            }
            StoreKind::Redis => {
                let store = RedisStore::from_config(config).map_err(|e| e.to_string())?;
                // Start anyway: not ready until Redis answers, then serving
                // without a restart.
                if let Err(e) = store.health().await {
                    tracing::warn!("budget store: Redis does not answer yet: {e}");
                }
                store
            }
        };
        // Loading the tokenizer takes a moment: do it before the first request.
        let _ = tokio::task::spawn_blocking(estimate::warm).await;
        Ok(Self::new(store, Clock::system(), config.on_unavailable))
    }

    pub fn new(store: Arc<dyn Store>, clock: Clock, on_unavailable: OnUnavailable) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                local: MemoryStore::new(),
                clock,
                on_unavailable,
            }),
        }
    }

    /// Reserves `estimate` for `client`, or answers the 429 (or 503) to send
    /// without calling upstream.
    pub async fn reserve(
        &self,
        client: &Client,
        model: &str,
        estimate: Estimate,
    ) -> Result<Reservation, ApiError> {
        let limits = client.budget;
        let now = self.inner.clock.now();
        let reserved = self
            .inner
            .store
            .reserve(&client.name, &limits, estimate.total(), now)
            .await;
        let mut reservation = Reservation {
            budgets: self.clone(),
            client: Arc::clone(&client.name),
            limits,
            model: model.to_owned(),
            estimate,
            hold: None,
            local: false,
            headers: HeaderMap::new(),
            request_id: None,
        };
        match reserved {
            Ok(reserved) => reservation.decide(reserved),
            Err(e) => match self.inner.on_unavailable {
                OnUnavailable::Allow => {
                    tracing::warn!(
                        client = %client.name,
                        "budget store unavailable, counting the request locally: {e}"
                    );
                    metrics::counter!("iris_budget_store_fallback_total", "client" => client.name.to_string())
                        .increment(1);
                    let reserved =
                        self.inner
                            .local
                            .reserve_now(&client.name, &limits, estimate.total(), now);
                    reservation.local = true;
                    reservation.decide(reserved)
                }
                OnUnavailable::Reject => {
                    tracing::error!(client = %client.name, "budget store unavailable: {e}");
                    reject_metric(&client.name, "store_unavailable");
                    Err(store_unavailable())
                }
            },
        }
    }

    /// The client's windows now.
    pub async fn snapshot(&self, client: &Client) -> Result<Snapshot, ApiError> {
        self.inner
            .store
            .snapshot(&client.name, &client.budget, self.inner.clock.now())
            .await
            .map_err(|e| {
                tracing::error!(client = %client.name, "budget store unavailable: {e}");
                store_unavailable()
            })
    }

    pub async fn health(&self) -> Result<(), StoreError> {
        self.inner.store.health().await
    }

    /// Persists everything (at shutdown, after in-flight requests drained).
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.inner.store.flush().await
    }

    fn settle_detached(
        &self,
        client: &str,
        limits: &BudgetConfig,
        hold: Hold,
        actual: u64,
        local: bool,
    ) {
        let now = self.inner.clock.now();
        if local {
            self.inner
                .local
                .settle_now(client, limits, &hold, actual, now);
        } else {
            run_detached(self.inner.store.settle(client, limits, hold, actual, now));
        }
    }
}

/// Drives a store future from synchronous code (a `Drop`): in-memory stores
/// finish on the first poll; others are spawned onto the runtime so the
/// accounting completes after the request is gone.
fn run_detached(mut future: StoreFuture<()>) {
    let mut cx = Context::from_waker(Waker::noop());
    match future.as_mut().poll(&mut cx) {
        Poll::Ready(Ok(())) => {}
        Poll::Ready(Err(e)) => tracing::error!("budget not settled: {e}"),
        Poll::Pending => match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if let Err(e) = future.await {
                        tracing::error!("budget not settled: {e}");
                    }
                });
            }
            Err(_) => tracing::error!("budget not settled: no runtime left to run the store on"),
        },
    }
}

fn store_unavailable() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        "The budget store is unavailable, so this request cannot be accounted. Try again shortly.",
    )
    .with_retry_after(Duration::from_secs(1))
}

fn reject_metric(client: &str, reason: &'static str) {
    metrics::counter!("iris_budget_rejections_total", "client" => client.to_owned(), "reason" => reason)
        .increment(1);
}

/// Tokens reserved for one admitted request, given back or corrected when it
/// ends. Dropping it without [`Reservation::finish`] releases it.
#[must_use = "dropping a reservation releases it at once"]
pub struct Reservation {
    budgets: Budgets,
    client: Arc<str>,
    limits: BudgetConfig,
    model: String,
    estimate: Estimate,
    /// `None` once settled.
    hold: Option<Hold>,
    /// Reserved in the local count while the store was down: settled there.
    local: bool,
    headers: HeaderMap,
    request_id: Option<String>,
}

impl Reservation {
    /// This reservation if `reserved` admitted it, else the 429 to answer.
    fn decide(mut self, reserved: Reserved) -> Result<Self, ApiError> {
        let headers = rate_limit_headers(&reserved.snapshot);
        match reserved.outcome {
            Ok(hold) => {
                self.hold = Some(hold);
                self.headers = headers;
                Ok(self)
            }
            Err(refusal) => {
                reject_metric(&self.client, refusal.window().name());
                let mut error = refusal_error(&refusal, &reserved.snapshot, self.estimate);
                error.headers.get_or_insert_default().extend(headers);
                Err(error)
            }
        }
    }

    pub fn estimate(&self) -> Estimate {
        self.estimate
    }

    /// The `x-ratelimit-*` headers for the response, as of the reservation.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// Names the request in the settlement log line.
    pub fn set_request_id(&mut self, id: &str) {
        self.request_id = Some(id.to_owned());
    }

    /// Settles from how the response ended: the upstream's reported usage;
    /// where none came, the prompt estimate plus the generated text counted
    /// by the tokenizer (a client that hung up pays for what was generated);
    /// an upstream error without usage releases everything.
    ///
    /// Counting a long generated text takes the tokenizer milliseconds, so
    /// that case runs on the blocking pool rather than in the relay (whose
    /// `poll` or `Drop` calls this).
    pub fn finish(self, outcome: Outcome, upstream_ok: bool) {
        let tokenize = outcome.usage.is_none() && upstream_ok;
        if tokenize
            && outcome.generated.len() > estimate::OFFLOAD_BYTES
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn_blocking(move || self.finish_now(&outcome, upstream_ok));
            return;
        }
        self.finish_now(&outcome, upstream_ok);
    }

    fn finish_now(self, outcome: &Outcome, upstream_ok: bool) {
        let (prompt, completion, total, source) = match outcome.usage {
            Some(usage) => (
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.total(),
                "upstream",
            ),
            None if upstream_ok => {
                let completion = estimate::count_tokens(&outcome.generated);
                let prompt = self.estimate.prompt;
                (prompt, completion, prompt + completion, "estimate")
            }
            None => (0, 0, 0, "released"),
        };
        let client = self.client.to_string();
        for (kind, tokens) in [("prompt", prompt), ("completion", completion)] {
            metrics::counter!("iris_tokens_total", "client" => client.clone(), "model" => self.model.clone(), "kind" => kind)
                .increment(tokens);
        }
        tracing::info!(
            request_id = self.request_id.as_deref().unwrap_or(""),
            client = %self.client,
            model = %self.model,
            reserved_tokens = self.estimate.total(),
            charged_tokens = total,
            prompt_tokens = prompt,
            completion_tokens = completion,
            source,
            complete = outcome.complete,
            "usage settled"
        );
        self.settle(total);
    }

    /// Replaces the reservation by `actual` tokens.
    pub fn settle(mut self, actual: u64) {
        if let Some(hold) = self.hold.take() {
            self.budgets
                .settle_detached(&self.client, &self.limits, hold, actual, self.local);
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(hold) = self.hold.take() {
            self.budgets
                .settle_detached(&self.client, &self.limits, hold, 0, self.local);
        }
    }
}

static TOKEN_HEADERS: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-limit-tokens"),
    HeaderName::from_static("x-ratelimit-remaining-tokens"),
    HeaderName::from_static("x-ratelimit-reset-tokens"),
];
static REQUEST_HEADERS: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-limit-requests"),
    HeaderName::from_static("x-ratelimit-remaining-requests"),
    HeaderName::from_static("x-ratelimit-reset-requests"),
];

/// `x-ratelimit-{limit,remaining,reset}-{tokens,requests}` for the client's
/// tightest token window (least remaining: the minute, day or month budget,
/// whichever will refuse first) and its requests-per-minute limit.
pub fn rate_limit_headers(snapshot: &Snapshot) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let tightest_tokens = [
        Window::TokensPerMinute,
        Window::TokensPerDay,
        Window::TokensPerMonth,
    ]
    .into_iter()
    .map(|w| snapshot.get(w))
    .filter(|w| w.limit.is_some())
    .min_by_key(|w| (w.remaining(), w.limit));
    let requests = Some(snapshot.get(Window::RequestsPerMinute)).filter(|w| w.limit.is_some());
    for (names, status) in [
        (&TOKEN_HEADERS, tightest_tokens),
        (&REQUEST_HEADERS, requests),
    ] {
        let Some(status) = status else { continue };
        let reset = status
            .reset_at
            .unwrap_or(snapshot.now)
            .saturating_sub(snapshot.now);
        let [limit, remaining, reset_name] = names;
        headers.insert(limit, HeaderValue::from(status.limit.unwrap_or(0)));
        headers.insert(
            remaining,
            HeaderValue::from(status.remaining().unwrap_or(0)),
        );
        if let Ok(value) = HeaderValue::try_from(duration_string(reset)) {
            headers.insert(reset_name, value);
        }
    }
    headers
}

/// A duration in OpenAI's rate-limit header format: `6m0s`, `1.5s`, `20ms`,
/// `13h20m5s`.
pub fn duration_string(ns: u64) -> String {
    let ms = ns.div_ceil(1_000_000);
    if ms == 0 {
        return "0s".into();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (hours, minutes) = (ms / 3_600_000, ms / 60_000 % 60);
    let seconds = ms % 60_000;
    let mut out = String::new();
    if hours > 0 {
        out.push_str(&format!("{hours}h"));
    }
    if hours > 0 || minutes > 0 {
        out.push_str(&format!("{minutes}m"));
    }
    let (whole, fraction) = (seconds / 1000, seconds % 1000);
    if fraction == 0 {
        out.push_str(&format!("{whole}s"));
    } else {
        let fraction = format!("{fraction:03}");
        out.push_str(&format!("{whole}.{}s", fraction.trim_end_matches('0')));
    }
    out
}

fn nanos(duration_ns: u64) -> Duration {
    Duration::from_nanos(duration_ns)
}

/// The 429 for a refusal, in OpenAI's words where OpenAI has some.
fn refusal_error(refusal: &Refusal, snapshot: &Snapshot, estimate: Estimate) -> ApiError {
    let status = |window: Window| -> &WindowStatus { snapshot.get(window) };
    let should_not_retry = |error: ApiError| {
        error.with_header(
            HeaderName::from_static("x-should-retry"),
            HeaderValue::from_static("false"),
        )
    };
    match *refusal {
        Refusal::RateLimited { window, wait } => {
            let current = status(window);
            let requested = if window.counts_tokens() {
                estimate.total()
            } else {
                1
            };
            let message = if window == Window::MaxConcurrent {
                format!(
                    "Concurrency limit reached: {} requests of yours are already in flight \
                     (max_concurrent = {}). Please try again when one has finished.",
                    current.used,
                    current.limit.unwrap_or(0)
                )
            } else {
                format!(
                    "Rate limit reached on {}: limit {}, used {}, requested {requested}. \
                     Please try again in {}.",
                    window.name(),
                    current.limit.unwrap_or(0),
                    current.used,
                    duration_string(wait)
                )
            };
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                message,
            )
            .with_retry_after(nanos(wait))
        }
        Refusal::Exhausted { window, reset_at } => {
            let current = status(window);
            let message = format!(
                "You exceeded your {} budget: limit {}, used {}, requested {}. \
                 It resets at {} (in {}).",
                window.name(),
                current.limit.unwrap_or(0),
                current.used,
                estimate.total(),
                window::format_utc(reset_at),
                duration_string(reset_at.saturating_sub(snapshot.now)),
            );
            should_not_retry(
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "insufficient_quota", message)
                    .with_retry_after(nanos(
                        reset_at
                            .saturating_sub(snapshot.now)
                            .max(NANOS_PER_SEC / 1000),
                    )),
            )
        }
        Refusal::TooLarge {
            window,
            limit,
            tokens,
        } => should_not_retry(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "insufficient_quota",
            format!(
                "This request may use up to {tokens} tokens ({} prompt + {} completion cap), \
                 more than your whole {} budget of {limit}. Lower max_completion_tokens \
                 or shorten the prompt.",
                estimate.prompt,
                estimate.completion,
                window.name()
            ),
        )),
    }
}

#[cfg(test)]
mod tests;
