//! Budget alerts: a client's or a team's daily or monthly window reaching a
//! threshold, posted once to the operator's webhook (`[alerts]`).
//!
//! The budget notices a threshold reached where it already holds the
//! numbers (a settlement, see [`crate::budget::thresholds`]) and hands an
//! [`Alert`] to [`Alerts::raise`]: an in-memory check and a `try_send` on a
//! bounded queue, never a wait (a full queue drops the alert and counts it;
//! a later settlement past the same threshold raises it again). Everything
//! that may wait runs in [`deliver`]'s background task: claiming the alert
//! in the shared store, so that it is sent once per subject, window,
//! threshold and period across every instance ([`AlertClaims`]), then
//! posting it, signed, retried with backoff.
//!
//! Nothing here knows the budget's types: an alert arrives as the plain
//! values it is posted with, and the budget stores implement
//! [`AlertClaims`] (as they implement [`crate::shared_health`]).

pub mod deliver;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;

use crate::secret::Secret;

/// `[alerts]`, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertSettings {
    /// `http` or `https`; any address (it is the operator's own setting,
    /// so the image fetcher's address policy does not apply).
    pub webhook_url: reqwest::Url,
    /// Signs each delivery's body (`X-Iris-Signature`).
    pub secret: Option<Secret>,
    /// Fractions of a window's limit, each in (0, 1], ascending.
    pub thresholds: Vec<f64>,
}

/// The default `thresholds`.
pub const DEFAULT_THRESHOLDS: [f64; 2] = [0.8, 1.0];

/// Alerts waiting for the delivery task; more are dropped (and counted).
pub const QUEUE_CAPACITY: usize = 1024;

/// Whose window reached a threshold.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Subject {
    /// `client` or `team`.
    pub kind: &'static str,
    pub name: String,
}

/// One threshold reached: the webhook's JSON body, and what the claim needs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alert {
    /// Always `budget.threshold`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub subject: Subject,
    /// The window's config key (`cost_per_month`).
    pub window: &'static str,
    pub threshold: f64,
    /// Tokens, or money in currency units.
    pub used: serde_json::Number,
    pub limit: serde_json::Number,
    /// The window's period's first instant, RFC 3339 UTC.
    pub period_start: String,
    /// When Iris noticed, RFC 3339 UTC.
    pub at: String,
    /// Unix nanoseconds when the period ends: the claim is kept until then.
    #[serde(skip)]
    pub period_end: u64,
    /// Unix nanoseconds of `at`.
    #[serde(skip)]
    pub at_ns: u64,
}

impl Alert {
    pub const TYPE: &str = "budget.threshold";

    /// What identifies the alert across instances: its subject, window,
    /// threshold and period (as JSON, so no name can run into the next part).
    pub fn claim_key(&self) -> String {
        serde_json::json!([
            self.subject.kind,
            self.subject.name,
            self.window,
            self.threshold,
            self.period_start
        ])
        .to_string()
    }

    /// How long the claim must outlive `at`: to the period's end, and an
    /// hour more for instances whose clocks run behind.
    pub fn claim_ttl(&self) -> Duration {
        Duration::from_nanos(self.period_end.saturating_sub(self.at_ns)) + CLAIM_MARGIN
    }
}

/// How long a claim is kept after its period ends.
const CLAIM_MARGIN: Duration = Duration::from_secs(3600);

/// What every claim returns: `'static`, so the delivery task owns it.
pub type ClaimFuture = Pin<Box<dyn Future<Output = Result<bool, ClaimError>> + Send + 'static>>;

/// The store did not answer a claim: it is asked again later.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ClaimError(pub String);

/// Where an alert is claimed before it is sent, so that only one instance
/// (and one run of one instance, where the store persists) sends it: the
/// budget store, which every instance that counts the same budgets shares.
pub trait AlertClaims: Send + Sync + 'static {
    /// Claims `key` for `ttl`: `true` for the first claim, `false` when it
    /// was claimed before (by this instance or another).
    fn claim(&self, key: &str, ttl: Duration) -> ClaimFuture;
}

/// The handle the budget raises alerts on; cheap to clone.
#[derive(Clone)]
pub struct Alerts {
    inner: Arc<Inner>,
}

struct Inner {
    thresholds: Vec<f64>,
    queue: mpsc::Sender<Alert>,
    /// Alerts already queued by this instance, by claim key, with the end
    /// of their period: a settlement past a threshold already raised
    /// costs a lookup, not a store round trip.
    raised: Mutex<HashMap<String, u64>>,
}

impl fmt::Debug for Alerts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Alerts")
            .field("thresholds", &self.inner.thresholds)
            .finish_non_exhaustive()
    }
}

/// Past this many remembered alerts, those of ended periods are forgotten.
const RAISED_PRUNE_AT: usize = 1024;

impl Alerts {
    /// Starts the delivery task (on the current runtime) and returns the
    /// handle that feeds it.
    pub fn start(settings: AlertSettings, claims: Arc<dyn AlertClaims>) -> Result<Self, String> {
        let (queue, received) = mpsc::channel(QUEUE_CAPACITY);
        let thresholds = settings.thresholds.clone();
        let delivery = deliver::Delivery::new(settings, claims, deliver::Schedule::default())?;
        tokio::spawn(delivery.run(received));
        Ok(Self {
            inner: Arc::new(Inner {
                thresholds,
                queue,
                raised: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The fractions of a window that are alerted on.
    pub fn thresholds(&self) -> &[f64] {
        &self.inner.thresholds
    }

    /// Queues `alert` for claiming and delivery unless this instance queued
    /// it already. Never waits: with the queue full it is dropped, counted,
    /// and not remembered, so the next settlement past it raises it again.
    pub fn raise(&self, alert: Alert) {
        let key = alert.claim_key();
        let mut raised = self
            .inner
            .raised
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if raised.contains_key(&key) {
            return;
        }
        if raised.len() >= RAISED_PRUNE_AT {
            let now = alert.at_ns;
            raised.retain(|_, end| *end > now);
        }
        let period_end = alert.period_end;
        match self.inner.queue.try_send(alert) {
            Ok(()) => {
                raised.insert(key, period_end);
            }
            Err(e) => {
                count("dropped");
                tracing::warn!(
                    alert = %key,
                    "budget alert dropped: {}",
                    match e {
                        mpsc::error::TrySendError::Full(_) => "the delivery queue is full",
                        mpsc::error::TrySendError::Closed(_) => "the delivery task has stopped",
                    }
                );
            }
        }
    }
}

/// Counts an alert's outcome in `iris_alerts_total`.
fn count(result: &'static str) {
    crate::metrics::ALERTS
        .counter(&[("result", result)])
        .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(name: &str) -> Alert {
        Alert {
            kind: Alert::TYPE,
            subject: Subject {
                kind: "client",
                name: name.into(),
            },
            window: "cost_per_month",
            threshold: 0.8,
            used: serde_json::Number::from_f64(80.5).unwrap_or(0.into()),
            limit: 100.into(),
            period_start: "2026-12-01T00:00:00Z".into(),
            at: "2026-12-05T14:00:00Z".into(),
            period_end: 2_000,
            at_ns: 1_000,
        }
    }

    #[test]
    fn the_body_is_the_contracts() {
        let body = serde_json::to_value(alert("a")).unwrap_or_default();
        assert_eq!(
            body,
            serde_json::json!({
                "type": "budget.threshold",
                "subject": {"kind": "client", "name": "a"},
                "window": "cost_per_month",
                "threshold": 0.8,
                "used": 80.5,
                "limit": 100,
                "period_start": "2026-12-01T00:00:00Z",
                "at": "2026-12-05T14:00:00Z",
            })
        );
    }

    #[test]
    fn claim_keys_cannot_run_into_each_other() {
        let mut slash = alert("a\",\"cost_per_month");
        slash.window = "x";
        assert_ne!(slash.claim_key(), alert("a").claim_key());
        assert_eq!(alert("a").claim_key(), alert("a").claim_key());
        assert_eq!(
            alert("a").claim_ttl(),
            Duration::from_nanos(1_000) + CLAIM_MARGIN
        );
    }
}
