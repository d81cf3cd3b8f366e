//! Fair-usage budgets per client, and upstreams' pacing: reserve an
//! estimate before forwarding, settle with the upstream's reported usage
//! when the response ends.
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
//! - [`account`]: whose windows (a client's, a team's, an upstream's pacing)
//! - [`estimate`]: tokens a request may cost (tokenizer, images, caps)
//! - [`money`]: amounts, prices, what usage costs
//! - [`window`]: the windows' arithmetic (GCRA per minute, UTC day and month)
//! - [`store`]: where the state lives (memory, SQLite, Redis)
//! - [`report`]: `iris usage`
//! - [`thresholds`]: which budget alerts a settlement raises
pub mod account;
mod counted;
pub mod estimate;
pub mod money;
mod o200k;
mod pieces;
pub mod report;
pub mod store;
pub mod thresholds;
pub mod window;

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::alerts::Alerts;
use crate::openai::chat::{ChatRequest, RequestLimits};
use crate::openai::stream::Outcome;
use crate::secret::Secret;
pub use account::{Account, AccountKind};
use estimate::Estimate;
use money::{Money, Price, TokenCounts};
use store::{
    MemoryStore, Parties, Party, RedisOptions, Refused, Reserved, Store, StoreError, StoreFuture,
};
use window::{Charge, Clock, Hold, Refusal, Snapshot, Window};

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
    /// In the pricing currency, UTC calendar day.
    pub cost_per_day: Option<Money>,
    /// UTC calendar month.
    pub cost_per_month: Option<Money>,
}

impl Limits {
    /// Whether any window counts tokens or money (so a request's estimate
    /// decides something and must be counted).
    pub fn counts_tokens(&self) -> bool {
        self.tokens_per_minute.is_some()
            || self.tokens_per_day.is_some()
            || self.tokens_per_month.is_some()
            || self.counts_cost()
    }

    /// Whether any window counts money.
    pub fn counts_cost(&self) -> bool {
        self.cost_per_day.is_some() || self.cost_per_month.is_some()
    }
}

/// What one client request asks the budgets for.
pub struct Claim<'a> {
    pub client: &'a Arc<str>,
    pub limits: &'a Limits,
    /// The client's team, with its limits: reserved against together.
    pub team: Option<(&'a str, &'a Limits)>,
    pub model: &'a str,
    pub estimate: Estimate,
    /// The highest of the model's deployments' prices (`None`: it costs
    /// nothing): what the estimate is reserved at.
    pub price: Option<Price>,
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

/// Why an upstream has no room for a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRoom {
    /// Its limits are reached; there may be room after `retry_after`
    /// (`None`: never for a request this large).
    Full { retry_after: Option<Duration> },
    /// The store did not answer and `on_unavailable = "reject"`.
    StoreUnavailable,
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

/// A refusal with what the client needs to hear about it: whose windows
/// refused (the client's, its team's), as they stand, and what the request
/// would have cost.
#[derive(Debug)]
pub struct Rejection {
    pub refusal: Refusal,
    /// The refusing account's windows.
    pub snapshot: Snapshot,
    /// The refusing account.
    pub account: Account,
    pub estimate: Estimate,
    /// The estimate's cost, as reserved.
    pub cost: Money,
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
    /// Where settlements raise budget alerts, with `[alerts]`.
    alerts: OnceLock<Alerts>,
}

impl Budgets {
    pub fn new(store: Arc<dyn Store>, clock: Clock, on_unavailable: OnUnavailable) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                local: MemoryStore::new(),
                clock,
                on_unavailable,
                pending: TaskTracker::new(),
                alerts: OnceLock::new(),
            }),
        }
    }

    /// From now on, settlements raise budget alerts on `alerts` (set once,
    /// at startup; a second call changes nothing).
    pub fn alert_on(&self, alerts: Alerts) {
        let _ = self.inner.alerts.set(alerts);
    }

    /// Reserves a client's request (and its team's share, in the same
    /// step), or says why not (without calling upstream).
    pub async fn reserve(&self, claim: Claim<'_>) -> Result<Reservation, BudgetError> {
        let Claim {
            client,
            limits,
            team,
            model,
            estimate,
            price,
        } = claim;
        let charge = Charge {
            tokens: estimate.total(),
            cost: price.map_or(Money::ZERO, |p| {
                p.most(estimate.prompt, estimate.completion)
            }),
        };
        let parties: Parties = match team {
            None => Arc::new([Party {
                account: Account::client(Arc::clone(client)),
                limits: *limits,
            }]),
            Some((team, team_limits)) => {
                let team = Account::team(team);
                Arc::new([
                    Party {
                        account: Account::member(Arc::clone(client), &team),
                        limits: *limits,
                    },
                    Party {
                        account: team,
                        limits: *team_limits,
                    },
                ])
            }
        };
        let (Reserved { outcome, snapshots }, local) = self
            .reserve_parties(&parties, charge)
            .await
            .inspect_err(|_| reject_metric(client, "store_unavailable"))?;
        match outcome {
            Ok(hold) => {
                let mut reservation =
                    self.reservation(parties, Some(model), estimate, hold, local, snapshots);
                reservation.price = price;
                Ok(reservation)
            }
            Err(Refused { party, refusal }) => {
                reject_metric(client, refusal.window().name());
                Err(BudgetError::Rejected(Box::new(Rejection {
                    refusal,
                    snapshot: snapshots[party],
                    account: parties[party].account.clone(),
                    estimate,
                    cost: charge.cost,
                })))
            }
        }
    }

    /// Reserves `claim` for a request already admitted by `admission` (a
    /// reservation of nothing, made so that a response-cache lookup counts
    /// as the request): the admission is released first (its request stays
    /// counted), then `claim` is reserved without counting the request in
    /// `requests_per_minute` again. Its concurrency slot is taken anew, so
    /// a request at the `max_concurrent` limit may lose its slot to another
    /// in between (then refused as that one would have been). The
    /// reservation's windows report the admission's request count.
    pub async fn reserve_admitted(
        &self,
        claim: Claim<'_>,
        admission: Reservation,
    ) -> Result<Reservation, BudgetError> {
        let admitted: Vec<Snapshot> = admission.snapshots.clone();
        admission.release().await;
        let uncounted = |limits: &Limits| Limits {
            requests_per_minute: None,
            ..*limits
        };
        let limits = uncounted(claim.limits);
        let team_limits = claim.team.map(|(name, limits)| (name, uncounted(limits)));
        let mut reservation = self
            .reserve(Claim {
                limits: &limits,
                team: team_limits.as_ref().map(|(name, limits)| (*name, limits)),
                ..claim
            })
            .await?;
        for (snapshot, admitted) in reservation.snapshots.iter_mut().zip(&admitted) {
            snapshot.windows[Window::RequestsPerMinute as usize] =
                *admitted.get(Window::RequestsPerMinute);
        }
        Ok(reservation)
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
        let parties: Parties = Arc::new([Party {
            account: Account::upstream(upstream),
            limits: *limits,
        }]);
        let (Reserved { outcome, snapshots }, local) = self
            .reserve_parties(&parties, Charge::tokens(estimate.total()))
            .await
            .map_err(|_| NoRoom::StoreUnavailable)?;
        match outcome {
            Ok(hold) => Ok(Some(
                self.reservation(parties, None, estimate, hold, local, snapshots),
            )),
            Err(Refused { refusal, .. }) => Err(NoRoom::Full {
                retry_after: retry_after(&refusal, snapshots[0].now),
            }),
        }
    }

    /// One atomic reservation of `charge` against every party's windows,
    /// in the store or, while it is down and `on_unavailable = "allow"`, in
    /// this instance's local count (then `true`).
    async fn reserve_parties(
        &self,
        parties: &Parties,
        charge: Charge,
    ) -> Result<(Reserved, bool), BudgetError> {
        let now = self.inner.clock.now();
        match self.inner.store.reserve(parties, charge, now).await {
            Ok(reserved) => Ok((reserved, false)),
            Err(e) => {
                let account = &parties[0].account;
                match self.inner.on_unavailable {
                    OnUnavailable::Allow => {
                        tracing::warn!(
                            %account,
                            "budget store unavailable, counting the request locally: {e}"
                        );
                        fallback_metric(account);
                        Ok((self.inner.local.reserve_now(parties, charge, now), true))
                    }
                    OnUnavailable::Reject => {
                        tracing::error!(%account, "budget store unavailable: {e}");
                        Err(BudgetError::StoreUnavailable)
                    }
                }
            }
        }
    }

    fn reservation(
        &self,
        parties: Parties,
        model: Option<&str>,
        estimate: Estimate,
        hold: Hold,
        local: bool,
        snapshots: Vec<Snapshot>,
    ) -> Reservation {
        Reservation {
            budgets: self.clone(),
            parties,
            model: model.map(str::to_owned),
            estimate,
            price: None,
            hold: Some(hold),
            local,
            snapshots,
            request_id: None,
            linked: None,
            uncounted_prompt: None,
            _pending: self.inner.pending.token(),
        }
    }

    /// The account's windows now: a client's (`/v1/usage`), an upstream's
    /// pacing (requests and tokens this minute, requests in flight).
    pub async fn snapshot(
        &self,
        account: &Account,
        limits: &Limits,
    ) -> Result<Snapshot, BudgetError> {
        self.inner
            .store
            .snapshot(account, limits, self.inner.clock.now())
            .await
            .map_err(|e| {
                tracing::error!(%account, "budget store unavailable: {e}");
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

    /// Runs a store's settlement that did not finish at once as a tracked
    /// task, so shutdown waits for it.
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

/// Counts a reservation made in the local count while the store is down,
/// under the metric of the account's kind: a client's request, or an
/// upstream's pacing (never a client).
fn fallback_metric(account: &Account) {
    let counter = match account.kind() {
        AccountKind::Client => {
            crate::metrics::BUDGET_STORE_FALLBACK.counter(&[("client", account.name())])
        }
        AccountKind::Upstream => {
            crate::metrics::UPSTREAM_PACING_FALLBACK.counter(&[("upstream", account.name())])
        }
        // Reserved with one of its clients' requests, which is counted.
        AccountKind::Team => return,
    };
    counter.increment(1);
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
    /// Of `prompt`, served from the provider's cache (priced `cached_input`).
    pub cached: u64,
    /// Of `completion`, reasoning (reported; priced inside `completion`).
    pub reasoning: u64,
    /// The tokens at the answering deployment's prices.
    pub cost: Money,
}

/// Tokens reserved for one admitted request. Settled exactly once, on one
/// of two paths:
/// - [`Reservation::settle`]: when the response's body ends, however it ends;
/// - `Drop`: when the request ends without an answer to settle (an error
///   path, a refusal after reserving, a retry elsewhere), giving back
///   everything but the request it counted.
#[must_use = "dropping a reservation releases it at once"]
pub struct Reservation {
    budgets: Budgets,
    /// The accounts reserved against: a client (and its team), or an
    /// upstream's pacing.
    parties: Parties,
    /// The model a client's request asked for, which names its token
    /// metrics; `None` for an upstream's pacing, which reports nothing.
    model: Option<String>,
    estimate: Estimate,
    /// What the tokens cost: the answering deployment's prices once one
    /// answered ([`Reservation::priced_at`]), else the reserved-at ones.
    price: Option<Price>,
    /// `None` once settled.
    hold: Option<Hold>,
    /// Reserved in the local count while the store was down: settled there.
    local: bool,
    /// Each party's windows as of the reservation.
    snapshots: Vec<Snapshot>,
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
        &self.snapshots[0]
    }

    /// The team's windows as of the reservation, for a team client's request.
    pub fn team_snapshot(&self) -> Option<&Snapshot> {
        self.snapshots.get(1)
    }

    /// The answering deployment's prices (`None`: it costs nothing), which
    /// the settlement charges the usage at.
    pub fn priced_at(&mut self, price: Option<Price>) {
        self.price = price;
    }

    /// Names the request in the settlement log line.
    pub fn set_request_id(&mut self, id: &str) {
        self.request_id = Some(id.to_owned());
    }

    /// Gives everything back but the request it counted, as its `Drop`
    /// does, and waits until the store has it (so that a reservation made
    /// next sees the slot free). The store's work runs on as a tracked task
    /// if the caller goes away.
    pub async fn release(mut self) {
        let Some(hold) = self.hold.take() else {
            return;
        };
        let inner = &self.budgets.inner;
        let now = inner.clock.now();
        if self.local {
            inner
                .local
                .settle_now(&self.parties, &hold, Charge::default(), now);
            return;
        }
        let settling = inner
            .store
            .settle(&self.parties, hold, Charge::default(), now);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!("budget not settled: no runtime left to run the store on");
            return;
        };
        match inner.pending.spawn_on(settling, &runtime).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!("budget not settled: {e}"),
            Err(e) => tracing::error!("budget not settled: {e}"),
        }
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

    /// When the response's body ends, however it ends (complete, cut, the
    /// client gone): charges the upstream's reported usage; where none came,
    /// the prompt estimate plus the generated text counted by the tokenizer
    /// (a client that hung up pays for what was generated); an upstream
    /// error without usage gives everything back. Then `then` gets what was
    /// charged (the spend log's record takes its token counts from there),
    /// wherever the settlement ran.
    ///
    /// The future resolves once the settlement is persisted as far as the
    /// store persists anything ([`Store::persisted`]): a complete response's
    /// last byte waits for it; a response that ended otherwise drops it,
    /// which leaves the settlement running as it is.
    ///
    /// Counting a long generated text takes the tokenizer milliseconds, so
    /// that case runs on the blocking pool (tracked, like every settlement
    /// that outlives its request) rather than in the caller, which is a
    /// response body being polled or dropped.
    pub fn settle(
        self,
        outcome: Outcome,
        upstream_ok: bool,
        then: impl FnOnce(Charged) + Send + 'static,
    ) -> StoreFuture<()> {
        let budgets = self.budgets.clone();
        let tokenize = outcome.usage.is_none() && upstream_ok;
        let text_bytes = outcome.generated.len()
            + self
                .uncounted_prompt
                .as_ref()
                .map_or(0, |(body, _)| body.len());
        let work = move || then(self.finish(&outcome, upstream_ok));
        if tokenize
            && text_bytes > estimate::OFFLOAD_BYTES
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let counting = budgets.inner.pending.spawn_blocking_on(work, &runtime);
            return Box::pin(async move {
                counting
                    .await
                    .map_err(|e| StoreError(format!("settlement failed: {e}")))?;
                budgets.inner.store.persisted().await
            });
        }
        work();
        budgets.inner.store.persisted()
    }

    /// [`Self::settle`]'s work, where it runs: what the outcome costs,
    /// reported as the client's usage, charged.
    fn finish(self, outcome: &Outcome, upstream_ok: bool) -> Charged {
        let (charged, source) = self.cost(outcome, upstream_ok);
        let actual = Charge {
            tokens: charged.total,
            cost: charged.cost,
        };
        match self.parties[0].account.kind() {
            AccountKind::Client => {
                self.report(charged, source, outcome.complete);
                self.watch(actual);
            }
            // Its tokens are a client's request's, reported as the client's
            // (a team is never a reservation's first party).
            AccountKind::Upstream | AccountKind::Team => {}
        }
        self.charge(actual);
        charged
    }

    /// Raises the budget alerts this settlement reaches, for the client
    /// and its team (see [`thresholds`] for why here and how): a
    /// comparison and a queue's `try_send`, nothing that waits.
    fn watch(&self, actual: Charge) {
        let (Some(alerts), Some(hold)) = (self.budgets.inner.alerts.get(), self.hold) else {
            return;
        };
        let held = Charge {
            tokens: hold.tokens,
            cost: hold.cost,
        };
        let now = self.budgets.inner.clock.now();
        for (party, snapshot) in self.parties.iter().zip(&self.snapshots) {
            let reached =
                thresholds::reached(alerts.thresholds(), &party.limits, snapshot, held, actual);
            for reached in reached {
                if let Some(alert) = thresholds::alert(&party.account, reached, snapshot.now, now) {
                    alerts.raise(alert);
                }
            }
        }
    }

    /// What the outcome costs, and from where that figure came (`upstream`,
    /// `estimate`, `released`).
    fn cost(&self, outcome: &Outcome, upstream_ok: bool) -> (Charged, &'static str) {
        let (mut charged, source) = match outcome.usage {
            Some(usage) => (
                Charged {
                    prompt: usage.prompt_tokens,
                    completion: usage.completion_tokens,
                    total: usage.total(),
                    cached: usage.cached_tokens(),
                    reasoning: usage.reasoning_tokens(),
                    cost: Money::ZERO,
                },
                "upstream",
            ),
            None if upstream_ok => {
                let completion = estimate::count_tokens(&outcome.generated);
                let prompt = self.prompt_tokens();
                (
                    Charged {
                        prompt,
                        completion,
                        total: prompt + completion,
                        ..Charged::default()
                    },
                    "estimate",
                )
            }
            None => (Charged::default(), "released"),
        };
        if let Some(price) = self.price {
            charged.cost = price.cost(TokenCounts {
                prompt: charged.prompt,
                cached: charged.cached,
                completion: charged.completion,
            });
        }
        (charged, source)
    }

    /// A client's settlement in the metrics and the log.
    fn report(&self, charged: Charged, source: &'static str, complete: bool) {
        let client = self.parties[0].account.name();
        let model = self.model.as_deref().unwrap_or_default();
        for (kind, tokens) in [
            ("prompt", charged.prompt),
            ("completion", charged.completion),
        ] {
            crate::metrics::TOKENS
                .counter(&[("client", client), ("model", model), ("kind", kind)])
                .increment(tokens);
        }
        tracing::info!(
            request_id = self.request_id.as_deref().unwrap_or(""),
            client,
            model,
            reserved_tokens = self.estimate.total(),
            charged_tokens = charged.total,
            prompt_tokens = charged.prompt,
            completion_tokens = charged.completion,
            cost = %charged.cost,
            source,
            complete,
            "usage settled"
        );
    }

    /// When the usage is known: replaces the reservation, and any linked
    /// to it, by `actual` (so an upstream's pacing is charged what its
    /// client's request was).
    fn charge(mut self, actual: Charge) {
        if let Some(linked) = self.linked.take() {
            linked.charge(actual);
        }
        self.give_back(actual);
    }

    /// The one place a hold goes back to where it was reserved, keeping
    /// `actual`: taken, so it happens once. In-memory stores finish
    /// on the spot; others run as a tracked task, so shutdown waits for
    /// them, and the caller never does.
    fn give_back(&mut self, actual: Charge) {
        let Some(hold) = self.hold.take() else {
            return;
        };
        let inner = &self.budgets.inner;
        let now = inner.clock.now();
        if self.local {
            inner.local.settle_now(&self.parties, &hold, actual, now);
            return;
        }
        let mut future = inner.store.settle(&self.parties, hold, actual, now);
        if let Poll::Ready(result) = future
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
        {
            if let Err(e) = result {
                tracing::error!("budget not settled: {e}");
            }
            return;
        }
        self.budgets.spawn(future);
    }
}

impl Drop for Reservation {
    /// When nothing settled it: everything but the request goes back.
    fn drop(&mut self) {
        // A linked reservation is dropped with this one, and gives itself back.
        self.give_back(Charge::default());
    }
}

/// A duration in OpenAI's rate-limit header format: `6m0s`, `1.5s`, `20ms`,
/// `13h20m5s`.
pub fn duration_string(ns: u64) -> String {
    let mut out = String::with_capacity(16);
    write_duration(&mut out, ns);
    out
}

/// [`duration_string`], written into `out` (the rate-limit headers write
/// theirs into one buffer with the other values). Numbers by `itoa`, not
/// `write!`: two of these go out with every response to a client with
/// limits, and `fmt`'s machinery cost more than the rest of the writing.
pub fn write_duration(out: &mut impl std::fmt::Write, ns: u64) {
    let mut digits = itoa::Buffer::new();
    let mut number = |out: &mut _, n: u64, unit: &str| {
        let _ = std::fmt::Write::write_str(out, digits.format(n));
        let _ = std::fmt::Write::write_str(out, unit);
    };
    let ms = ns.div_ceil(1_000_000);
    if ms < 1000 {
        let (n, unit) = if ms == 0 { (0, "s") } else { (ms, "ms") };
        number(out, n, unit);
        return;
    }
    let (hours, minutes) = (ms / 3_600_000, ms / 60_000 % 60);
    let seconds = ms % 60_000;
    if hours > 0 {
        number(out, hours, "h");
    }
    if hours > 0 || minutes > 0 {
        number(out, minutes, "m");
    }
    let (whole, fraction) = (seconds / 1000, seconds % 1000);
    if fraction == 0 {
        number(out, whole, "s");
    } else {
        // Milliseconds as a decimal fraction without its trailing zeros:
        // the three digits of 1000 + fraction, less the leading 1.
        number(out, whole, ".");
        let mut padded = itoa::Buffer::new();
        let padded = padded.format(1000 + fraction);
        let _ = out.write_str(padded[1..].trim_end_matches('0'));
        let _ = out.write_str("s");
    }
}

/// How long to wait after `now` before a retry can succeed: until the
/// window has room, or until a spent budget resets. `None` when retrying
/// cannot help (the request alone is larger than the window).
fn retry_after(refusal: &Refusal, now: u64) -> Option<Duration> {
    match *refusal {
        Refusal::RateLimited { wait, .. } => Some(Duration::from_nanos(wait)),
        Refusal::Exhausted { reset_at, .. } => Some(Duration::from_nanos(
            reset_at
                .saturating_sub(now)
                .max(window::NANOS_PER_SEC / 1000),
        )),
        Refusal::TooLarge { .. } => None,
    }
}

impl Rejection {
    /// How long the client should wait before a retry can succeed (see
    /// [`retry_after`]).
    pub fn retry_after(&self) -> Option<Duration> {
        retry_after(&self.refusal, self.snapshot.now)
    }

    /// `your`, or `your team research's`: whose budget refused.
    fn whose(&self) -> String {
        match self.account.kind() {
            AccountKind::Team => format!("your team {}'s", self.account.name()),
            AccountKind::Client | AccountKind::Upstream => "your".to_owned(),
        }
    }

    /// An amount of `window`'s unit as a person reads it: money to the
    /// millionth (at least cents), else a count.
    fn amount(window: Window, amount: u64) -> String {
        if window.counts_cost() {
            Money::from_micros(amount).to_string()
        } else {
            amount.to_string()
        }
    }

    /// What the request asked of `window`.
    fn requested(&self, window: Window) -> u64 {
        window.amount(Charge {
            tokens: self.estimate.total(),
            cost: self.cost,
        })
    }
}

/// The client-facing message, in OpenAI's words where OpenAI has some.
impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let estimate = self.estimate;
        let snapshot = &self.snapshot;
        let whose = self.whose();
        match self.refusal {
            Refusal::RateLimited { window, wait } => {
                let current = snapshot.get(window);
                if window == Window::MaxConcurrent {
                    let of = match self.account.kind() {
                        AccountKind::Team => format!("your team {}", self.account.name()),
                        AccountKind::Client | AccountKind::Upstream => "yours".to_owned(),
                    };
                    return write!(
                        f,
                        "Concurrency limit reached: {} requests of {of} are already in flight \
                         (max_concurrent = {}). Please try again when one has finished.",
                        current.used,
                        current.limit.unwrap_or(0)
                    );
                }
                let on = match self.account.kind() {
                    AccountKind::Team => format!("{whose} "),
                    AccountKind::Client | AccountKind::Upstream => String::new(),
                };
                write!(
                    f,
                    "Rate limit reached on {on}{}: limit {}, used {}, requested {}. \
                     Please try again in {}.",
                    window.name(),
                    current.limit.unwrap_or(0),
                    current.used,
                    self.requested(window),
                    duration_string(wait)
                )
            }
            Refusal::Exhausted { window, reset_at } => {
                let current = snapshot.get(window);
                write!(
                    f,
                    "You exceeded {whose} {} budget: limit {}, used {}, requested {}. \
                     It resets at {} (in {}).",
                    window.name(),
                    Self::amount(window, current.limit.unwrap_or(0)),
                    Self::amount(window, current.used),
                    Self::amount(window, self.requested(window)),
                    window::format_utc(reset_at),
                    duration_string(reset_at.saturating_sub(snapshot.now)),
                )
            }
            Refusal::TooLarge {
                window,
                limit,
                amount,
            } if window.counts_cost() => write!(
                f,
                "This request may cost up to {} ({} prompt + {} completion tokens at the \
                 model's highest prices), more than {whose} whole {} budget of {}. Lower \
                 max_completion_tokens or shorten the prompt.",
                Self::amount(window, amount),
                estimate.prompt,
                estimate.completion,
                window.name(),
                Self::amount(window, limit),
            ),
            Refusal::TooLarge {
                window,
                limit,
                amount,
            } => write!(
                f,
                "This request may use up to {amount} tokens ({} prompt + {} completion cap), \
                 more than {whose} whole {} budget of {limit}. Lower max_completion_tokens \
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
