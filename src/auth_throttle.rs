//! Failed authentication, throttled per source address: after a burst of
//! wrong keys (client or admin) from one address, that address gets 429 for
//! a while instead of more guesses. Only failures are counted, so valid keys
//! are never slowed, even from a busy address. (governor's keyed GCRA, the
//! same algorithm as the minute budgets.) The address is the client's as
//! [`crate::client_addr`] decides it: behind a trusted proxy, the forwarded
//! one, so one client's guesses do not lock out everyone behind the proxy.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Failures allowed at once from one address...
const BURST: u32 = 20;
/// ...then one more every this long.
const REFILL: Duration = Duration::from_secs(6);
/// Addresses remembered before the idle ones are forgotten.
const REMEMBERED: usize = 10_000;

pub struct AuthFailures {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
}

impl Default for AuthFailures {
    fn default() -> Self {
        let burst = NonZeroU32::new(BURST).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(REFILL)
            .unwrap_or_else(|| Quota::per_minute(NonZeroU32::MIN))
            .allow_burst(burst);
        Self {
            limiter: RateLimiter::keyed(quota),
        }
    }
}

impl AuthFailures {
    /// Counts a failed authentication from `address`: `Err` with how long
    /// until it may try again once it is over its allowance.
    pub fn failed(&self, address: IpAddr) -> Result<(), Duration> {
        if self.limiter.len() > REMEMBERED {
            self.limiter.retain_recent();
        }
        self.limiter
            .check_key(&address)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_failures_is_allowed_then_refused_per_address() {
        let failures = AuthFailures::default();
        let attacker: IpAddr = "192.0.2.1".parse().expect("ip");
        let neighbour: IpAddr = "192.0.2.2".parse().expect("ip");
        for _ in 0..BURST {
            assert!(failures.failed(attacker).is_ok());
        }
        let wait = failures.failed(attacker).expect_err("over the burst");
        assert!(wait > Duration::ZERO && wait <= REFILL, "{wait:?}");
        assert!(
            failures.failed(neighbour).is_ok(),
            "other addresses are not affected"
        );
    }
}
