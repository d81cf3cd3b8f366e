//! Fair-usage budgets per client: reserve an estimate before forwarding,
//! settle with the upstream's reported usage when the response ends.
//!
//! Checking first and charging later would let concurrent requests
//! overspend many times over; a reservation charges every window at once,
//! atomically, and settlement only corrects it. A [`Reservation`] is settled
//! exactly once: by [`Reservation::settle`] when its response ends, or by its
//! `Drop` (an error path, a client gone), which gives it back. Settlements
//! that cannot finish at once run as tasks tracked by [`Budgets`], which
//! [`Budgets::shutdown`] waits for before the store is flushed.
//!
//! Nothing here knows HTTP: refusals are [`BudgetError`]s, rendered as 429s
//! (and their headers) at the edge.
//!
//! - [`estimate`]: tokens a request may cost (tokenizer, images, caps)
//! - [`window`]: the windows' arithmetic (GCRA per minute, UTC day and month)
//! - [`store`]: where the state lives (memory, SQLite, Redis)
//! - [`report`]: `iris usage`
pub mod estimate;
pub mod report;
pub mod store;
pub mod window;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::openai::chat::{ChatRequest, RequestLimits};
use crate::openai::stream::Outcome;
use crate::secret::Secret;
use estimate::Estimate;
use store::{
    MemoryStore, RedisOptions, RedisStore, Reserved, SqliteStore, Store, StoreError, StoreFuture,
};
use window::{Clock, Hold, Refusal, Snapshot, Window};

/// A client's limits. Every one is optional; an absent one is not enforced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct Limits {
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    /// UTC calendar day.
    pub tokens_per_day: Option<u64>,
    /// UTC calendar month.
    pub tokens_per_month: Option<u64>,
    pub max_concurrent: Option<u64>,
}

impl Limits {
    /// Whether any window counts tokens (so a request's estimate decides
    /// something and must be counted).
    pub fn counts_tokens(&self) -> bool {
        self.tokens_per_minute.is_some()
            || self.tokens_per_day.is_some()
            || self.tokens_per_month.is_some()
    }
}

/// What to do when the store does not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnUnavailable {
    /// Answer 503 `store_unavailable`: the safe default when budgets are money.
    #[default]
    Reject,
    /// Admit the request and count it locally until the store is back.
    Allow,
}

/// Where budget state lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreBackend {
    /// Nothing persisted.
    Memory,
    /// The embedded default: live state in memory, written to this file.
    Sqlite { path: PathBuf },
    /// Shared by every instance.
    Redis { url: Secret, options: RedisOptions },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSettings {
    pub backend: StoreBackend,
    pub on_unavailable: OnUnavailable,
}

/// Upstream pacing accounts share the store with clients, under names no
/// client can have (client names may not hold control characters).
const UPSTREAM_ACCOUNT: &str = "\u{1}upstream/";

/// Why an upstream has no room for a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRoom {
    /// Its limits are reached; there may be room after `retry_after`
    /// (`None`: never for a request this large).
    Full { retry_after: Option<Duration> },
    /// The store did not answer and `on_unavailable = "reject"`.
    StoreUnavailable,
}

/// Whose budget a reservation is charged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Account {
    Client,
    /// An upstream's pacing limits: settled like a client's, not reported
    /// as a client's usage.
    Upstream,
}

/// Why a request gets no reservation.
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    /// A window cannot hold the request.
    #[error("{0}")]
    Rejected(Box<Rejection>),
    /// The store did not answer and `on_unavailable = "reject"`.
    #[error(
        "The budget store is unavailable, so this request cannot be accounted. Try again shortly."
    )]
    StoreUnavailable,
}

/// A refusal with what the client needs to hear about it: the windows as
/// they stand and what the request would have cost.
#[derive(Debug)]
pub struct Rejection {
    pub refusal: Refusal,
    pub snapshot: Snapshot,
    pub estimate: Estimate,
}

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
    /// Reservations not yet settled, and settlements still running after
    /// their request ended: what shutdown waits for before flushing.
    pending: TaskTracker,
}

impl Budgets {
    /// Opens the configured store (loading an SQLite file and starting its
    /// background writer).
    pub async fn open(settings: &StoreSettings) -> Result<Self, String> {
        let store: Arc<dyn Store> = match &settings.backend {
            StoreBackend::Memory => Arc::new(MemoryStore::new()),
            StoreBackend::Sqlite { path } => {
                let path = path.clone();
                let store = tokio::task::spawn_blocking(move || SqliteStore::open(&path))
                    .await
                    .map_err(|e| format!("store: {e}"))?
                    .map_err(|e| e.to_string())?;
                store.spawn_flusher(store::FLUSH_EVERY);
                store
            }
            StoreBackend::Redis { url, options } => {
                let store = RedisStore::connect(url.expose(), options.clone())
                    .map_err(|e| e.to_string())?;
                // Start anyway: not ready until Redis answers, then serving
                // without a restart.
                if let Err(e) = store.health().await {
                    tracing::warn!("budget store: Redis does not answer yet: {e}");
                }
                store
            }
        };
        Ok(Self::new(store, Clock::system(), settings.on_unavailable))
    }

    pub fn new(store: Arc<dyn Store>, clock: Clock, on_unavailable: OnUnavailable) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                local: MemoryStore::new(),
                clock,
                on_unavailable,
                pending: TaskTracker::new(),
            }),
        }
    }

    /// Reserves `estimate` for `client`, or says why not (without calling
    /// upstream).
    pub async fn reserve(
        &self,
        client: &Arc<str>,
        limits: &Limits,
        model: &str,
        estimate: Estimate,
    ) -> Result<Reservation, BudgetError> {
        let (Reserved { outcome, snapshot }, local) = self
            .reserve_account(client, limits, estimate.total())
            .await
            .inspect_err(|_| reject_metric(client, "store_unavailable"))?;
        match outcome {
            Ok(hold) => Ok(self.reservation(
                Account::Client,
                client,
                limits,
                model,
                estimate,
                hold,
                local,
                snapshot,
            )),
            Err(refusal) => {
                reject_metric(client, refusal.window().name());
                Err(BudgetError::Rejected(Box::new(Rejection {
                    refusal,
                    snapshot,
                    estimate,
                })))
            }
        }
    }

    /// Reserves room for one request of `estimate` under an upstream's
    /// pacing limits (`None` when it has none), or says how long until
    /// there may be room.
    pub async fn reserve_room(
        &self,
        upstream: &str,
        limits: &Limits,
        estimate: Estimate,
    ) -> Result<Option<Reservation>, NoRoom> {
        if *limits == Limits::default() {
            return Ok(None);
        }
        let account: Arc<str> = Arc::from(format!("{UPSTREAM_ACCOUNT}{upstream}"));
        let (Reserved { outcome, snapshot }, local) = self
            .reserve_account(&account, limits, estimate.total())
            .await
            .map_err(|_| NoRoom::StoreUnavailable)?;
        match outcome {
            Ok(hold) => Ok(Some(self.reservation(
                Account::Upstream,
                &account,
                limits,
                upstream,
                estimate,
                hold,
                local,
                snapshot,
            ))),
            Err(refusal) => Err(NoRoom::Full {
                retry_after: Rejection {
                    refusal,
                    snapshot,
                    estimate,
                }
                .retry_after(),
            }),
        }
    }

    /// One atomic reservation of `tokens` against `account`'s windows, in
    /// the store or, while it is down and `on_unavailable = "allow"`, in
    /// this instance's local count (then `true`).
    async fn reserve_account(
        &self,
        account: &str,
        limits: &Limits,
        tokens: u64,
    ) -> Result<(Reserved, bool), BudgetError> {
        let now = self.inner.clock.now();
        match self.inner.store.reserve(account, limits, tokens, now).await {
            Ok(reserved) => Ok((reserved, false)),
            Err(e) => match self.inner.on_unavailable {
                OnUnavailable::Allow => {
                    tracing::warn!(
                        account,
                        "budget store unavailable, counting the request locally: {e}"
                    );
                    crate::metrics::BUDGET_STORE_FALLBACK
                        .counter(&[("client", account)])
                        .increment(1);
                    Ok((
                        self.inner.local.reserve_now(account, limits, tokens, now),
                        true,
                    ))
                }
                OnUnavailable::Reject => {
                    tracing::error!(account, "budget store unavailable: {e}");
                    Err(BudgetError::StoreUnavailable)
                }
            },
        }
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "a private constructor of one struct"
    )]
    fn reservation(
        &self,
        account: Account,
        name: &Arc<str>,
        limits: &Limits,
        model: &str,
        estimate: Estimate,
        hold: Hold,
        local: bool,
        snapshot: Snapshot,
    ) -> Reservation {
        Reservation {
            budgets: self.clone(),
            account,
            client: Arc::clone(name),
            limits: *limits,
            model: model.to_owned(),
            estimate,
            hold: Some(hold),
            local,
            snapshot,
            request_id: None,
            linked: None,
            uncounted_prompt: None,
            _pending: self.inner.pending.token(),
        }
    }

    /// An upstream's pacing windows now (requests and tokens this minute,
    /// requests in flight), against its `limits`.
    pub async fn room(&self, upstream: &str, limits: &Limits) -> Result<Snapshot, BudgetError> {
        self.snapshot(&format!("{UPSTREAM_ACCOUNT}{upstream}"), limits)
            .await
    }

    /// The store itself, for what else it shares (deployment health).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// The client's windows now.
    pub async fn snapshot(&self, client: &str, limits: &Limits) -> Result<Snapshot, BudgetError> {
        self.inner
            .store
            .snapshot(client, limits, self.inner.clock.now())
            .await
            .map_err(|e| {
                tracing::error!(client, "budget store unavailable: {e}");
                BudgetError::StoreUnavailable
            })
    }

    pub async fn health(&self) -> Result<(), StoreError> {
        self.inner.store.health().await
    }

    /// At shutdown, once requests stopped coming: waits for every
    /// reservation to be settled (bounded by `wait`) and the settlements
    /// still running, then persists everything.
    pub async fn shutdown(&self, wait: Duration) -> Result<(), StoreError> {
        self.inner.pending.close();
        if tokio::time::timeout(wait, self.inner.pending.wait())
            .await
            .is_err()
        {
            tracing::error!(
                unsettled = self.inner.pending.len(),
                "reservations still unsettled at shutdown: their tokens stay reserved"
            );
        }
        self.inner.store.flush().await
    }

    /// Gives `hold` back, charging `actual` tokens instead, without making
    /// the caller wait: in-memory stores finish on the spot; others run as a
    /// tracked task, so shutdown waits for them.
    fn settle_detached(&self, client: &str, limits: &Limits, hold: Hold, actual: u64, local: bool) {
        let now = self.inner.clock.now();
        if local {
            self.inner
                .local
                .settle_now(client, limits, &hold, actual, now);
            return;
        }
        let mut future = self.inner.store.settle(client, limits, hold, actual, now);
        if let Poll::Ready(result) = future
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
        {
            if let Err(e) = result {
                tracing::error!("budget not settled: {e}");
            }
            return;
        }
        self.spawn(future);
    }

    fn spawn(&self, future: StoreFuture<()>) {
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                self.inner.pending.spawn_on(
                    async move {
                        if let Err(e) = future.await {
                            tracing::error!("budget not settled: {e}");
                        }
                    },
                    &runtime,
                );
            }
            Err(_) => tracing::error!("budget not settled: no runtime left to run the store on"),
        }
    }
}

fn reject_metric(client: &str, reason: &'static str) {
    crate::metrics::BUDGET_REJECTIONS
        .counter(&[("client", client), ("reason", reason)])
        .increment(1);
}

/// What a settled request was charged: the upstream's reported usage, else
/// the prompt estimate and the generated text counted; nothing for an
/// upstream error without usage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Charged {
    pub prompt: u64,
    pub completion: u64,
    /// What the budget was charged: the upstream's `total_tokens` where it
    /// reported more than the sum.
    pub total: u64,
}

/// Tokens reserved for one admitted request. Settled exactly once: by
/// [`Reservation::settle`] when the response ends, else by `Drop`, which
/// gives everything back but the request it counted.
#[must_use = "dropping a reservation releases it at once"]
pub struct Reservation {
    budgets: Budgets,
    account: Account,
    client: Arc<str>,
    limits: Limits,
    model: String,
    estimate: Estimate,
    /// `None` once settled.
    hold: Option<Hold>,
    /// Reserved in the local count while the store was down: settled there.
    local: bool,
    snapshot: Snapshot,
    request_id: Option<String>,
    /// Charged what this one is charged (the upstream's pacing for the
    /// client's request), or released with it.
    linked: Option<Box<Reservation>>,
    /// The request's body, when its prompt was not tokenized at reservation
    /// (no token limit applied): counted only if the settlement needs it.
    uncounted_prompt: Option<(Bytes, RequestLimits)>,
    /// Counts the reservation as pending until it is dropped.
    _pending: TaskTrackerToken,
}

impl Reservation {
    pub fn estimate(&self) -> Estimate {
        self.estimate
    }

    /// The client's windows as of the reservation (for the rate-limit headers).
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// Names the request in the settlement log line.
    pub fn set_request_id(&mut self, id: &str) {
        self.request_id = Some(id.to_owned());
    }

    /// The estimate's prompt is a rough figure: if the settlement has no
    /// usage from the upstream, the prompt is counted from `body` (parsed
    /// under the `limits` it was accepted under) then.
    pub fn count_prompt_later(&mut self, body: Bytes, limits: RequestLimits) {
        self.uncounted_prompt = Some((body, limits));
    }

    /// The prompt's tokens as estimated, counted now if they were not.
    fn prompt_tokens(&self) -> u64 {
        match &self.uncounted_prompt {
            Some((body, limits)) => ChatRequest::parse_within(body, *limits)
                .map_or(self.estimate.prompt, |request| {
                    estimate::prompt_tokens(&request)
                }),
            None => self.estimate.prompt,
        }
    }

    /// Settles `other` with this reservation: charged the same tokens, or
    /// released with it (replacing any reservation linked before).
    pub fn link(&mut self, other: Option<Reservation>) {
        self.linked = other.map(Box::new);
    }

    /// Settles from how the response ended: the upstream's reported usage;
    /// where none came, the prompt estimate plus the generated text counted
    /// by the tokenizer (a client that hung up pays for what was generated);
    /// an upstream error without usage gives everything back.
    ///
    /// Counting a long generated text takes the tokenizer milliseconds, so
    /// that case runs on the blocking pool (tracked, like every settlement
    /// that outlives its request) rather than in the caller, which is a
    /// response body being polled or dropped.
    pub fn settle(self, outcome: Outcome, upstream_ok: bool) {
        self.settle_then(outcome, upstream_ok, |_| {});
    }

    /// [`Self::settle`], then `then` with what was charged (the spend log's
    /// record takes its token counts from there), wherever the settlement
    /// runs.
    pub fn settle_then(
        self,
        outcome: Outcome,
        upstream_ok: bool,
        then: impl FnOnce(Charged) + Send + 'static,
    ) {
        drop(self.settle_in_turn(outcome, upstream_ok, then));
    }

    /// [`Self::settle_then`], and a future that resolves once the
    /// settlement is persisted as far as the store persists anything
    /// ([`Store::persisted`]): a complete response's last byte waits for it.
    /// Dropping the future leaves the settlement as done as it is.
    pub fn settle_persisted(
        self,
        outcome: Outcome,
        upstream_ok: bool,
        then: impl FnOnce(Charged) + Send + 'static,
    ) -> StoreFuture<()> {
        let budgets = self.budgets.clone();
        match self.settle_in_turn(outcome, upstream_ok, then) {
            None => budgets.inner.store.persisted(),
            Some(counting) => Box::pin(async move {
                counting
                    .await
                    .map_err(|e| StoreError(format!("settlement failed: {e}")))?;
                budgets.inner.store.persisted().await
            }),
        }
    }

    /// Settles now, or on the blocking pool when the generated text must be
    /// counted first (then the task is returned).
    fn settle_in_turn(
        self,
        outcome: Outcome,
        upstream_ok: bool,
        then: impl FnOnce(Charged) + Send + 'static,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let tokenize = outcome.usage.is_none() && upstream_ok;
        let text_bytes = outcome.generated.len()
            + self
                .uncounted_prompt
                .as_ref()
                .map_or(0, |(body, _)| body.len());
        if tokenize
            && text_bytes > estimate::OFFLOAD_BYTES
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let tracker = self.budgets.inner.pending.clone();
            return Some(tracker.spawn_blocking_on(
                move || then(self.settle_now(&outcome, upstream_ok)),
                &runtime,
            ));
        }
        then(self.settle_now(&outcome, upstream_ok));
        None
    }

    fn settle_now(mut self, outcome: &Outcome, upstream_ok: bool) -> Charged {
        let (prompt, completion, total, source) = match outcome.usage {
            Some(usage) => (
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.total(),
                "upstream",
            ),
            None if upstream_ok => {
                let completion = estimate::count_tokens(&outcome.generated);
                let prompt = self.prompt_tokens();
                (prompt, completion, prompt + completion, "estimate")
            }
            None => (0, 0, 0, "released"),
        };
        if let Some(linked) = self.linked.take() {
            linked.charge(total);
        }
        let charged = Charged {
            prompt,
            completion,
            total,
        };
        if self.account == Account::Upstream {
            self.replace_hold(total);
            return charged;
        }
        let client = self.client.to_string();
        for (kind, tokens) in [("prompt", prompt), ("completion", completion)] {
            crate::metrics::TOKENS
                .counter(&[("client", &client), ("model", &self.model), ("kind", kind)])
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
        self.replace_hold(total);
        charged
    }

    /// Replaces the reservation (and any linked one) by exactly `actual` tokens.
    pub fn charge(mut self, actual: u64) {
        if let Some(linked) = self.linked.take() {
            linked.charge(actual);
        }
        self.replace_hold(actual);
    }

    /// The one place a hold is given back: it is taken, so it happens once.
    fn replace_hold(&mut self, actual: u64) {
        if let Some(hold) = self.hold.take() {
            self.budgets
                .settle_detached(&self.client, &self.limits, hold, actual, self.local);
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.replace_hold(0);
    }
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

impl Rejection {
    /// How long the client should wait before a retry can succeed: until the
    /// window has room, or until a spent budget resets. `None` when retrying
    /// cannot help (the request alone is larger than the window).
    pub fn retry_after(&self) -> Option<Duration> {
        match self.refusal {
            Refusal::RateLimited { wait, .. } => Some(Duration::from_nanos(wait)),
            Refusal::Exhausted { reset_at, .. } => Some(Duration::from_nanos(
                reset_at
                    .saturating_sub(self.snapshot.now)
                    .max(window::NANOS_PER_SEC / 1000),
            )),
            Refusal::TooLarge { .. } => None,
        }
    }
}

/// The client-facing message, in OpenAI's words where OpenAI has some.
impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let estimate = self.estimate;
        let snapshot = &self.snapshot;
        match self.refusal {
            Refusal::RateLimited { window, wait } => {
                let current = snapshot.get(window);
                if window == Window::MaxConcurrent {
                    return write!(
                        f,
                        "Concurrency limit reached: {} requests of yours are already in flight \
                         (max_concurrent = {}). Please try again when one has finished.",
                        current.used,
                        current.limit.unwrap_or(0)
                    );
                }
                let requested = if window.counts_tokens() {
                    estimate.total()
                } else {
                    1
                };
                write!(
                    f,
                    "Rate limit reached on {}: limit {}, used {}, requested {requested}. \
                     Please try again in {}.",
                    window.name(),
                    current.limit.unwrap_or(0),
                    current.used,
                    duration_string(wait)
                )
            }
            Refusal::Exhausted { window, reset_at } => {
                let current = snapshot.get(window);
                write!(
                    f,
                    "You exceeded your {} budget: limit {}, used {}, requested {}. \
                     It resets at {} (in {}).",
                    window.name(),
                    current.limit.unwrap_or(0),
                    current.used,
                    estimate.total(),
                    window::format_utc(reset_at),
                    duration_string(reset_at.saturating_sub(snapshot.now)),
                )
            }
            Refusal::TooLarge {
                window,
                limit,
                tokens,
            } => write!(
                f,
                "This request may use up to {tokens} tokens ({} prompt + {} completion cap), \
                 more than your whole {} budget of {limit}. Lower max_completion_tokens \
                 or shorten the prompt.",
                estimate.prompt,
                estimate.completion,
                window.name()
            ),
        }
    }
}

#[cfg(test)]
mod tests;
