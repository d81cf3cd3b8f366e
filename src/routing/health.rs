//! Deployment health: failures counted in a sliding window, cooldowns, and
//! their sharing with other instances ([`SharedHealth`]), so that with Redis
//! every instance skips a deployment one instance saw failing.
//!
//! Every instance decides from its own memory, so checking health costs no
//! round trip: local failures and cooldowns are written there at once, and
//! shared ones are pulled in by [`Health::refresh`], which the app runs
//! every [`REFRESH_EVERY`].

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::{FAILURE_WINDOW, Failure, RoutingSettings};
use crate::catalog::Deployment;
use crate::shared_health::SharedHealth;

/// How often shared cooldowns are read (and the cooling gauges brought up
/// to date).
pub const REFRESH_EVERY: Duration = Duration::from_millis(500);

/// Why a deployment cools down (the `reason` of `iris_upstream_cooldowns_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cooldown {
    /// `allowed_fails` failures within the window.
    Failures,
    /// The upstream answered 429.
    RateLimited,
    /// The upstream refused Iris's key (401/403).
    Auth,
}

impl Cooldown {
    pub fn label(self) -> &'static str {
        match self {
            Cooldown::Failures => "failures",
            Cooldown::RateLimited => "rate_limited",
            Cooldown::Auth => "auth",
        }
    }
}

/// Attempts and failures over the last five minutes, in 10 s buckets.
#[derive(Default)]
struct Recent {
    /// (bucket number, attempts, failures), newest last.
    buckets: VecDeque<(u64, u64, u64)>,
}

const BUCKET: Duration = Duration::from_secs(10);
const RECENT: Duration = Duration::from_secs(300);

impl Recent {
    fn record(&mut self, bucket: u64, failed: bool) {
        match self.buckets.back_mut() {
            Some((b, attempts, failures)) if *b == bucket => {
                *attempts += 1;
                *failures += u64::from(failed);
            }
            _ => self.buckets.push_back((bucket, 1, u64::from(failed))),
        }
        self.trim(bucket);
    }

    fn trim(&mut self, bucket: u64) {
        let keep = RECENT.as_secs() / BUCKET.as_secs();
        while self
            .buckets
            .front()
            .is_some_and(|(b, ..)| b + keep <= bucket)
        {
            self.buckets.pop_front();
        }
    }

    fn totals(&mut self, bucket: u64) -> (u64, u64) {
        self.trim(bucket);
        self.buckets
            .iter()
            .fold((0, 0), |(a, f), (_, attempts, failures)| {
                (a + attempts, f + failures)
            })
    }
}

/// What `/admin/upstreams` shows of one deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// How long its cooldown still runs, if it is cooling down.
    pub cooling_for: Option<Duration>,
    /// Attempts and failed attempts in the last five minutes.
    pub attempts: u64,
    pub failures: u64,
}

#[derive(Default)]
struct State {
    recent: Recent,
    failures: VecDeque<Instant>,
    /// Cooling down until then, as this instance decided.
    local_until: Option<Instant>,
    /// Cooling down until then, as shared (another instance's cooldown).
    shared_until: Option<Instant>,
    /// The metric labels, kept to update the gauge.
    labels: Option<(String, String)>,
}

impl State {
    fn until(&self) -> Option<Instant> {
        self.local_until.max(self.shared_until)
    }
}

pub struct Health {
    /// By deployment (the operator's names: foldhash, not SipHash).
    states: Mutex<HashMap<Arc<str>, State, foldhash::fast::RandomState>>,
    /// Where health is shared with other instances; `None` where the
    /// store is this process's own (then its memory is the whole truth).
    shared: Option<Arc<dyn SharedHealth>>,
    /// Where the 10 s buckets of [`Recent`] count from.
    started: Instant,
}

impl Health {
    pub fn new(shared: Option<Arc<dyn SharedHealth>>) -> Self {
        Self {
            states: Mutex::default(),
            shared,
            started: Instant::now(),
        }
    }

    fn bucket(&self, now: Instant) -> u64 {
        now.duration_since(self.started).as_secs() / BUCKET.as_secs()
    }

    /// Counts an attempt on deployment `key` (`failed` or not), ended at
    /// `at`, for the last-five-minutes figures.
    pub fn attempted(&self, key: &Arc<str>, failed: bool, at: Instant) {
        let bucket = self.bucket(at);
        if let Ok(mut states) = self.states.lock() {
            // Looked up before `entry`, which would take (and mostly drop)
            // a clone of the key.
            let state = match states.get_mut(&**key) {
                Some(state) => state,
                None => states.entry(Arc::clone(key)).or_default(),
            };
            state.recent.record(bucket, failed);
        }
    }

    /// The deployment's state now, for operators.
    pub fn report(&self, key: &str) -> Report {
        let now = Instant::now();
        let bucket = self.bucket(now);
        let Ok(mut states) = self.states.lock() else {
            return Report {
                cooling_for: None,
                attempts: 0,
                failures: 0,
            };
        };
        match states.get_mut(key) {
            Some(state) => {
                let (attempts, failures) = state.recent.totals(bucket);
                Report {
                    cooling_for: state
                        .until()
                        .filter(|until| *until > now)
                        .map(|until| until - now),
                    attempts,
                    failures,
                }
            }
            None => Report {
                cooling_for: None,
                attempts: 0,
                failures: 0,
            },
        }
    }

    /// When the deployment's cooldown ends, if it is cooling down at `now`.
    pub fn cooling_until(&self, key: &str, now: Instant) -> Option<Instant> {
        let states = self.states.lock().ok()?;
        states.get(key)?.until().filter(|until| *until > now)
    }

    /// Records a failed attempt on `deployment`: a cooldown starts after
    /// `allowed_fails` failures within the window, at once on a 429 (for
    /// its Retry-After or `cooldown`, the longer) or a 401/403. Returns the
    /// cooldown started, if one did.
    pub fn failed(
        &self,
        deployment: &Deployment,
        failure: Failure,
        retry_after: Option<Duration>,
        settings: &RoutingSettings,
    ) -> Option<Cooldown> {
        let now = Instant::now();
        let key = &deployment.key;
        let immediate = match failure {
            Failure::Status(429) => Some((
                Cooldown::RateLimited,
                settings.cooldown.max(retry_after.unwrap_or_default()),
            )),
            failure if failure.is_auth() => Some((Cooldown::Auth, settings.cooldown)),
            _ => None,
        };
        let mut states = self.states.lock().ok()?;
        let state = states.entry(Arc::clone(key)).or_default();
        state.labels.get_or_insert_with(|| labels(deployment));
        while state
            .failures
            .front()
            .is_some_and(|at| now.duration_since(*at) >= FAILURE_WINDOW)
        {
            state.failures.pop_front();
        }
        state.failures.push_back(now);
        let started = match immediate {
            Some((reason, length)) => Some((reason, length)),
            None if state.failures.len() >= settings.allowed_fails as usize => {
                Some((Cooldown::Failures, settings.cooldown))
            }
            None => None,
        };
        let already = state.until().is_some_and(|until| until > now);
        if let Some((_, length)) = started {
            state.local_until = state.local_until.max(Some(now + length));
            state.failures.clear();
        }
        drop(states);

        // Shared with the other instances, never waited for: health is
        // advice, not accounting.
        if let Some(shared) = &self.shared {
            let share = match started {
                Some((_, length)) => shared.share_cooldown(key, length),
                None => shared.share_failure(
                    key,
                    FAILURE_WINDOW,
                    settings.allowed_fails,
                    settings.cooldown,
                ),
            };
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    if let Err(e) = share.await {
                        tracing::debug!("deployment health not shared: {e}");
                    }
                });
            }
        }

        let (reason, length) = started?;
        let (upstream, model) = labels(deployment);
        crate::metrics::UPSTREAM_COOLDOWNS
            .counter(&[("upstream", &upstream), ("reason", reason.label())])
            .increment(1);
        crate::metrics::UPSTREAM_COOLING
            .gauge(&[("upstream", &upstream), ("model", &model)])
            .set(1.0);
        if reason == Cooldown::Auth && !already {
            // Once per cooldown: Iris's own key for this upstream is wrong.
            tracing::error!(
                upstream = %upstream,
                model = %model,
                cooldown_ms = length.as_millis() as u64,
                "the upstream refused Iris's API key (401/403): check upstreams[].api_key; \
                 the deployment cools down"
            );
        } else if !already {
            tracing::warn!(
                upstream = %upstream,
                model = %model,
                reason = reason.label(),
                cooldown_ms = length.as_millis() as u64,
                "deployment cooling down"
            );
        }
        Some(reason)
    }

    /// Pulls the shared cooldowns of `deployments` and brings the cooling
    /// gauges up to date.
    pub async fn refresh(&self, deployments: &[(Arc<str>, String, String)]) {
        let shared = match &self.shared {
            Some(shared) => {
                let keys: Vec<Arc<str>> = deployments
                    .iter()
                    .map(|(key, ..)| Arc::clone(key))
                    .collect();
                match shared.shared_cooldowns(&keys).await {
                    Ok(remaining) => Some(remaining),
                    Err(e) => {
                        tracing::debug!("shared cooldowns not read: {e}");
                        None
                    }
                }
            }
            None => None,
        };
        let now = Instant::now();
        let Ok(mut states) = self.states.lock() else {
            return;
        };
        for (i, (key, upstream, model)) in deployments.iter().enumerate() {
            let state = states.entry(Arc::clone(key)).or_default();
            state
                .labels
                .get_or_insert_with(|| (upstream.clone(), model.clone()));
            if let Some(remaining) = &shared {
                state.shared_until = remaining.get(i).copied().flatten().map(|left| now + left);
            }
            let cooling = state.until().is_some_and(|until| until > now);
            crate::metrics::UPSTREAM_COOLING
                .gauge(&[("upstream", upstream), ("model", model)])
                .set(if cooling { 1.0 } else { 0.0 });
        }
    }
}

fn labels(deployment: &Deployment) -> (String, String) {
    let upstream = deployment.upstream.name.clone();
    let model = deployment
        .key
        .split_once('/')
        .map_or_else(String::new, |(_, model)| model.to_owned());
    (upstream, model)
}
