//! Whether a request gets another attempt after one failed, where, and how
//! long it waits first: decisions of plain values (the gateway's attempt
//! loop gathers them, carries the verdict out, and keeps the state: which
//! deployments were tried or given up, when each may be tried again).
//!
//! The rules, in order: a failure `retry_on` does not name ends the
//! request, as do `retries` spent and the deadline (the first upstream's
//! timeout, for every attempt together); an upstream that asks for a wait
//! (`Retry-After`) longer than `max_retry_wait` is not tried again in this
//! request, so the request goes elsewhere or ends; a shorter wait is
//! honoured before the same deployment is tried again, as is a jittered
//! backoff, whichever is longer, unless the deadline comes first. Which
//! deployment comes next is [`super::select`]'s; what a failure does to a
//! deployment's health (401/403 and 429 cool it down at once) is
//! [`super::health`]'s.

use std::time::Duration;

use super::{Failure, RoutingSettings};

/// A failed attempt, as the decision after it sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailedAttempt {
    pub failure: Failure,
    /// The wait the upstream asked for (`Retry-After`), if it did.
    pub retry_after: Option<Duration>,
    /// Attempts made in this request, this one included.
    pub attempts: u32,
    /// Time left before the request's deadline (zero: it passed).
    pub left: Duration,
    /// Whether a deployment other than this one may still be tried (none
    /// was given up on).
    pub others_open: bool,
}

/// What follows a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// No more attempts: the last failure is the answer.
    Stop,
    /// Another attempt, on this deployment too (other ones first); on this
    /// one not within `not_before` of now, when its upstream asked.
    Retry { not_before: Option<Duration> },
    /// Another attempt, but never on this deployment in this request: its
    /// upstream asked for a wait longer than `max_retry_wait`.
    Elsewhere,
}

/// What follows `attempt`'s failure under `settings`.
pub fn after_failure(attempt: &FailedAttempt, settings: &RoutingSettings) -> Next {
    let retry = settings.retry_on.retries(attempt.failure)
        && attempt.attempts <= settings.retries
        && !attempt.left.is_zero();
    if !retry {
        return Next::Stop;
    }
    match attempt.retry_after {
        // Not waited for: another deployment may answer instead.
        Some(wait) if wait > settings.max_retry_wait => {
            if attempt.others_open {
                Next::Elsewhere
            } else {
                Next::Stop
            }
        }
        not_before => Next::Retry { not_before },
    }
}

/// Before another attempt on a deployment already tried in this request:
/// the wait, the longer of `backoff` (jittered, [`super::backoff`]) and
/// what is `left` of the wait its upstream asked for (`asked`); `None`
/// when the deadline (`left` of the request's time) would come first.
pub fn wait_before_retry(backoff: Duration, asked: Duration, left: Duration) -> Option<Duration> {
    let wait = backoff.max(asked);
    (wait < left).then_some(wait)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::RetryOn;

    const S: fn(u64) -> Duration = Duration::from_secs;
    const MS: fn(u64) -> Duration = Duration::from_millis;

    /// A first attempt with time left and another deployment open.
    fn failed(failure: Failure) -> FailedAttempt {
        FailedAttempt {
            failure,
            retry_after: None,
            attempts: 1,
            left: S(5),
            others_open: true,
        }
    }

    #[test]
    fn after_a_failure_under_the_default_settings() {
        use Failure::{Connect, Invalid, Status, Timeout};
        use Next::{Elsewhere, Retry, Stop};
        let again = Retry { not_before: None };
        let after = |wait| Retry {
            not_before: Some(wait),
        };
        let rows: &[(&str, FailedAttempt, Next)] = &[
            ("refused or reset", failed(Connect), again),
            ("no response head in time", failed(Timeout), again),
            (
                "a 200 that is not an answer: as 502",
                failed(Invalid),
                again,
            ),
            ("a server error", failed(Status(503)), again),
            ("the request's fault", failed(Status(400)), Stop),
            ("not found", failed(Status(404)), Stop),
            ("unprocessable", failed(Status(422)), Stop),
            // Iris's key refused: retried (elsewhere first, by the
            // selector; the deployment cools down, by health).
            ("401", failed(Status(401)), again),
            ("403", failed(Status(403)), again),
            ("429 without Retry-After", failed(Status(429)), again),
            (
                "429 asking for 2 s: waited for on this deployment",
                FailedAttempt {
                    retry_after: Some(S(2)),
                    ..failed(Status(429))
                },
                after(S(2)),
            ),
            (
                "Retry-After honoured on any status",
                FailedAttempt {
                    retry_after: Some(MS(1500)),
                    ..failed(Status(503))
                },
                after(MS(1500)),
            ),
            (
                "Retry-After of exactly max_retry_wait",
                FailedAttempt {
                    retry_after: Some(S(10)),
                    ..failed(Status(429))
                },
                after(S(10)),
            ),
            (
                "Retry-After past max_retry_wait: another deployment",
                FailedAttempt {
                    retry_after: Some(S(11)),
                    ..failed(Status(429))
                },
                Elsewhere,
            ),
            (
                "Retry-After past max_retry_wait and nowhere else to go",
                FailedAttempt {
                    retry_after: Some(S(11)),
                    others_open: false,
                    ..failed(Status(429))
                },
                Stop,
            ),
            (
                "nowhere else, but no long wait asked: this one again",
                FailedAttempt {
                    others_open: false,
                    ..failed(Status(503))
                },
                again,
            ),
            (
                "the second attempt failed: one retry left",
                FailedAttempt {
                    attempts: 2,
                    ..failed(Status(503))
                },
                again,
            ),
            (
                "the third attempt failed: retries = 2 spent",
                FailedAttempt {
                    attempts: 3,
                    ..failed(Status(503))
                },
                Stop,
            ),
            (
                "the deadline passed",
                FailedAttempt {
                    left: Duration::ZERO,
                    ..failed(Connect)
                },
                Stop,
            ),
            (
                "a moment left",
                FailedAttempt {
                    left: Duration::from_nanos(1),
                    ..failed(Connect)
                },
                again,
            ),
            (
                "not retried, whatever the upstream asked",
                FailedAttempt {
                    retry_after: Some(S(60)),
                    ..failed(Status(400))
                },
                Stop,
            ),
        ];
        let settings = RoutingSettings::default();
        for (what, attempt, next) in rows {
            assert_eq!(after_failure(attempt, &settings), *next, "{what}");
        }
    }

    #[test]
    fn retry_on_and_retries_decide_what_is_tried_again() {
        let settings = RoutingSettings {
            retries: 0,
            ..RoutingSettings::default()
        };
        assert_eq!(
            after_failure(&failed(Failure::Connect), &settings),
            Next::Stop,
            "retries = 0: one attempt"
        );
        let settings = RoutingSettings {
            retry_on: RetryOn {
                connect: false,
                timeout: true,
                statuses: vec![500],
            },
            ..RoutingSettings::default()
        };
        let rows = [
            (Failure::Connect, Next::Stop),
            (Failure::Timeout, Next::Retry { not_before: None }),
            (Failure::Status(500), Next::Retry { not_before: None }),
            (Failure::Status(503), Next::Stop),
            (Failure::Status(401), Next::Stop),
            // Without 502 in the list, a 200 that is not an answer is not retried.
            (Failure::Invalid, Next::Stop),
        ];
        for (failure, next) in rows {
            assert_eq!(
                after_failure(&failed(failure), &settings),
                next,
                "{failure:?}"
            );
        }
    }

    #[test]
    fn the_wait_before_a_deployment_is_tried_again() {
        let rows = [
            // (backoff, asked, left) -> wait
            ((MS(100), Duration::ZERO, S(5)), Some(MS(100))),
            ((MS(100), S(2), S(5)), Some(S(2))),
            ((S(3), S(2), S(5)), Some(S(3))),
            ((MS(100), S(2), S(2)), None),
            ((S(3), Duration::ZERO, S(1)), None),
            ((Duration::ZERO, Duration::ZERO, Duration::ZERO), None),
            (
                (Duration::ZERO, Duration::ZERO, MS(1)),
                Some(Duration::ZERO),
            ),
        ];
        for ((backoff, asked, left), wait) in rows {
            assert_eq!(
                wait_before_retry(backoff, asked, left),
                wait,
                "backoff {backoff:?}, asked {asked:?}, left {left:?}"
            );
        }
    }
}
