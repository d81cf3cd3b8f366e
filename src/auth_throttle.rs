//! Failed authentication, throttled per source address: after a burst of
//! wrong keys (client or admin) from one address, that address gets 429 for
//! a while instead of more guesses. Only failures are counted, so valid keys
//! are never slowed, even from a busy address. (governor's keyed GCRA, the
//! same algorithm as the minute budgets.) The address is the client's as
//! [`crate::client_addr`] decides it: behind a trusted proxy, the forwarded
//! one, so one client's guesses do not lock out everyone behind the proxy.
//! An IPv6 address counts as its /64, the block a host or subscriber is
//! given: stepping through one's own addresses is not a way past the limit.

use std::net::{IpAddr, Ipv6Addr};
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
            .check_key(&source(address))
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

/// What failures from `address` are counted under: an IPv4 address as it
/// is (also written as an IPv4-mapped IPv6 one), an IPv6 address's /64.
fn source(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !(u128::from(u64::MAX)))),
        },
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

    #[test]
    fn an_ipv6_client_counts_as_its_slash_64_and_a_mapped_ipv4_as_itself() {
        let failures = AuthFailures::default();
        // Each guess from another address of one /64.
        for host in 0..BURST {
            let address: IpAddr = format!("2001:db8:1:2::{:x}", host + 1).parse().expect("ip");
            assert!(failures.failed(address).is_ok(), "{address}");
        }
        let same_block: IpAddr = "2001:db8:1:2:ffff:ffff:ffff:ffff".parse().expect("ip");
        assert!(
            failures.failed(same_block).is_err(),
            "the /64 is over its burst"
        );
        let next_block: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert!(failures.failed(next_block).is_ok(), "another /64 is not");

        let v4: IpAddr = "192.0.2.9".parse().expect("ip");
        let mapped: IpAddr = "::ffff:192.0.2.9".parse().expect("ip");
        for _ in 0..BURST / 2 {
            assert!(failures.failed(v4).is_ok());
            assert!(failures.failed(mapped).is_ok());
        }
        assert!(failures.failed(v4).is_err(), "one address, however written");
    }
}
