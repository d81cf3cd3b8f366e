//! Routing a request between a model's deployments: which deployment an
//! attempt goes to, which failures are worth another attempt and how long
//! to wait first, which deployments cool down, and the fair queue for
//! upstream room. The gateway runs the attempts; this module decides.
//!
//! - [`select`]: priority tier, then weight, skipping cooling deployments
//! - [`retry`]: after a failed attempt, whether to try again, where, and
//!   how long to wait first
//! - [`health`]: failures and cooldowns, shared between instances
//! - [`queue`]: waiting for upstream room, round-robin across clients
//! - [`view`]: what operators see of each deployment (`/admin/upstreams`,
//!   `iris upstreams`)

pub mod health;
pub mod queue;
pub mod retry;
pub mod select;
pub mod view;

use std::time::Duration;

/// `[routing]`: retries and failover between deployments.
#[derive(Debug, Clone)]
pub struct RoutingSettings {
    /// Attempts after the first.
    pub retries: u32,
    pub retry_on: RetryOn,
    /// Before re-trying the same deployment: jittered, doubling.
    pub backoff: Duration,
    /// An upstream `Retry-After` longer than this is not waited for.
    pub max_retry_wait: Duration,
    /// Failures within [`FAILURE_WINDOW`] that put a deployment in cooldown.
    pub allowed_fails: u32,
    /// How long a deployment is skipped (or the upstream's `Retry-After`, if longer).
    pub cooldown: Duration,
    /// How long a request may wait for upstream room before 429.
    pub max_queue: Duration,
}

impl Default for RoutingSettings {
    fn default() -> Self {
        Self {
            retries: 2,
            retry_on: RetryOn::default(),
            backoff: Duration::from_millis(100),
            max_retry_wait: Duration::from_secs(10),
            allowed_fails: 3,
            cooldown: Duration::from_secs(30),
            max_queue: Duration::ZERO,
        }
    }
}

/// The window in which `allowed_fails` failures put a deployment in cooldown.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// Which failed attempts are tried again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryOn {
    /// The connection was refused or reset, or the body was not an answer.
    pub connect: bool,
    /// No response head within the upstream's timeout.
    pub timeout: bool,
    /// These upstream statuses.
    pub statuses: Vec<u16>,
}

impl Default for RetryOn {
    fn default() -> Self {
        Self {
            connect: true,
            timeout: true,
            statuses: vec![401, 403, 429, 500, 502, 503, 504],
        }
    }
}

/// Why an attempt failed, as far as routing cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Refused, reset, or an answer that was not one (garbage with 200).
    Connect,
    /// No response head in time.
    Timeout,
    /// The upstream answered this status.
    Status(u16),
    /// A 200 whose body is not a chat completion (not JSON, not events).
    Invalid,
}

impl Failure {
    /// The `outcome` label of `iris_upstream_attempts_total`.
    pub fn label(self) -> String {
        match self {
            Failure::Connect => "connect".into(),
            Failure::Timeout => "timeout".into(),
            Failure::Invalid => "invalid".into(),
            Failure::Status(status) => status.to_string(),
        }
    }

    /// Upstream 401/403: Iris's own key for it is wrong.
    pub fn is_auth(self) -> bool {
        matches!(self, Failure::Status(401 | 403))
    }
}

impl RetryOn {
    pub fn retries(&self, failure: Failure) -> bool {
        match failure {
            Failure::Connect => self.connect,
            Failure::Timeout => self.timeout,
            // What a gateway in front would call a bad gateway.
            Failure::Invalid => self.statuses.contains(&502),
            Failure::Status(status) => self.statuses.contains(&status),
        }
    }
}

/// Whether an upstream status counts against the deployment's health:
/// server errors, rate limits and refused credentials do; other 4xx are
/// the request's fault.
pub fn unhealthy(status: u16) -> bool {
    status >= 500 || matches!(status, 401 | 403 | 429)
}

/// The wait before attempt number `attempt` (1 = the first retry) on a
/// deployment that already failed in this request: `backoff` doubled per
/// attempt, with full jitter over its upper half so that many clients'
/// retries spread out.
pub fn backoff(base: Duration, attempt: u32) -> Duration {
    let doubled = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let half = doubled / 2;
    let jitter = u64::try_from(half.as_micros()).unwrap_or(u64::MAX);
    let random = getrandom::u64().unwrap_or(0);
    half + Duration::from_micros(if jitter == 0 {
        0
    } else {
        random % (jitter + 1)
    })
}

/// An upstream's requested wait, from `retry-after-ms` (milliseconds,
/// OpenAI's) or `Retry-After` (seconds; an HTTP date is not honoured).
pub fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let read = |name: &str| headers.get(name)?.to_str().ok()?.trim().parse::<f64>().ok();
    if let Some(ms) = read("retry-after-ms").filter(|ms| ms.is_finite() && *ms >= 0.0) {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    read("retry-after")
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_in_the_upper_half() {
        let base = Duration::from_millis(100);
        for attempt in 1..=4 {
            let full = base * (1 << (attempt - 1));
            for _ in 0..50 {
                let wait = backoff(base, attempt);
                assert!(wait >= full / 2 && wait <= full, "{attempt}: {wait:?}");
            }
        }
        assert_eq!(backoff(Duration::ZERO, 3), Duration::ZERO);
    }

    #[test]
    fn retry_after_reads_milliseconds_first_then_seconds() {
        let mut headers = http::HeaderMap::new();
        headers.insert("retry-after", http::HeaderValue::from_static("2"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(2)));
        headers.insert("retry-after-ms", http::HeaderValue::from_static("1500"));
        assert_eq!(retry_after(&headers), Some(Duration::from_millis(1500)));
        headers.insert("retry-after-ms", http::HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(2)));
        headers.insert(
            "retry-after",
            http::HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn which_failures_are_retried() {
        let retry_on = RetryOn::default();
        assert!(retry_on.retries(Failure::Connect));
        assert!(retry_on.retries(Failure::Status(503)));
        assert!(!retry_on.retries(Failure::Status(400)));
        assert!(!retry_on.retries(Failure::Status(404)));
        assert!(unhealthy(503) && unhealthy(429) && unhealthy(401));
        assert!(!unhealthy(400) && !unhealthy(422));
    }
}
