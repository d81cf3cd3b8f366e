//! Which budget alerts a settlement raises: a client's or a team's daily or
//! monthly window (tokens or money, only limited ones) at or past a
//! threshold of its limit (`used >= threshold * limit`).
//!
//! **Where.** At settlement, from numbers the reservation already holds:
//! each party's snapshot as of the reservation, with the request's own
//! reserved estimate replaced by what it was actually charged. No store
//! round trip, so nothing is added to a request but a comparison.
//!
//! **Why there, not at the reservation.** A reservation holds an estimate
//! (the prompt and the whole completion cap, at the model's highest
//! price), usually far above what the request costs, and an upstream error
//! gives it all back: alerting on it would announce thresholds that usage
//! never reached. At settlement the request's real charge is known.
//!
//! **Why nothing is missed.** The snapshot counts every request reserved
//! before this one: settled ones at their charge, those still in flight at
//! their estimate (as `/v1/usage` does). So the last request reserved of
//! those that together cross a threshold sees them all, each at least at
//! its charge (an estimate is a ceiling), and raises the alert when it
//! settles. An instance sharing the store sees the others' requests the
//! same way; the store's claim keeps the alert to one delivery.

use super::Limits;
use super::account::{Account, AccountKind};
use super::money::Money;
use super::window::{Charge, Snapshot, Window, format_utc, period_start};
use crate::alerts::{Alert, Subject};

/// The windows alerts watch: the daily and monthly ones.
pub const WATCHED: [Window; 4] = [
    Window::TokensPerDay,
    Window::TokensPerMonth,
    Window::CostPerDay,
    Window::CostPerMonth,
];

/// A window at or past a threshold, in the window's unit (tokens or
/// micro-units of money).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reached {
    pub window: Window,
    pub threshold: f64,
    pub used: u64,
    pub limit: u64,
}

/// The thresholds one party's windows are at or past after a settlement:
/// `snapshot` is as of the reservation, which held `held`; the request was
/// charged `actual` instead.
pub fn reached(
    thresholds: &[f64],
    limits: &Limits,
    snapshot: &Snapshot,
    held: Charge,
    actual: Charge,
) -> Vec<Reached> {
    let mut found = Vec::new();
    for window in WATCHED {
        let Some(limit) = window.limit(limits).filter(|limit| *limit > 0) else {
            continue;
        };
        let used = snapshot
            .get(window)
            .used
            .saturating_sub(window.amount(held))
            .saturating_add(window.amount(actual));
        for &threshold in thresholds {
            // Exact for every amount below 2^53 (tokens, micro-units).
            let at = used as f64 >= threshold * limit as f64;
            if used > 0 && at {
                found.push(Reached {
                    window,
                    threshold,
                    used,
                    limit,
                });
            }
        }
    }
    found
}

/// The alert for `reached` on `account`'s window, in the period that held
/// `snapshot_at` (the reservation's instant), noticed at `now`. `None` for
/// an account alerts are not about (an upstream's pacing).
pub fn alert(account: &Account, reached: Reached, snapshot_at: u64, now: u64) -> Option<Alert> {
    let kind = match account.kind() {
        AccountKind::Client => "client",
        AccountKind::Team => "team",
        AccountKind::Upstream => return None,
    };
    let amount = |value: u64| -> serde_json::Number {
        if reached.window.counts_cost() {
            serde_json::Number::from_f64(Money::from_micros(value).units())
                .unwrap_or_else(|| value.into())
        } else {
            value.into()
        }
    };
    let periods = super::window::Periods::at(snapshot_at);
    Some(Alert {
        kind: Alert::TYPE,
        subject: Subject {
            kind,
            name: account.name().to_owned(),
        },
        window: reached.window.name(),
        threshold: reached.threshold,
        used: amount(reached.used),
        limit: amount(reached.limit),
        period_start: format_utc(period_start(reached.window, snapshot_at)),
        at: format_utc(now),
        period_end: periods.end_of(reached.window),
        at_ns: now,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::window::{ClientState, NANOS_PER_SEC};

    /// 2026-12-05T14:00:00Z.
    const NOW: u64 = 1_796_479_200 * NANOS_PER_SEC;

    fn snapshot(limits: &Limits, tokens: u64, micros: u64) -> Snapshot {
        let mut state = ClientState::default();
        let charge = Charge {
            tokens,
            cost: Money::from_micros(micros),
        };
        let _ = state.reserve(&Limits::default(), charge, NOW);
        state.snapshot(limits, NOW)
    }

    #[test]
    fn thresholds_are_judged_on_the_actual_charge() {
        let limits = Limits {
            tokens_per_day: Some(1000),
            cost_per_month: Some(Money::from_micros(10_000_000)),
            // Not watched: a minute's window.
            tokens_per_minute: Some(10),
            ..Limits::default()
        };
        let thresholds = [0.8, 1.0];
        let held = Charge {
            tokens: 500,
            cost: Money::from_micros(5_000_000),
        };
        // 900 tokens reserved (500 of them this request's estimate): 700 after.
        let snap = snapshot(&limits, 900, 9_000_000);
        let actual = Charge {
            tokens: 300,
            cost: Money::from_micros(3_000_000),
        };
        assert_eq!(reached(&thresholds, &limits, &snap, held, actual), []);
        // Charged what it held: 900 tokens is past 80%, 9.00 of 10.00 too.
        let found = reached(&thresholds, &limits, &snap, held, held);
        assert_eq!(
            found,
            [
                Reached {
                    window: Window::TokensPerDay,
                    threshold: 0.8,
                    used: 900,
                    limit: 1000
                },
                Reached {
                    window: Window::CostPerMonth,
                    threshold: 0.8,
                    used: 9_000_000,
                    limit: 10_000_000
                },
            ]
        );
        // Exactly the limit reaches 1.0; a settlement above it too.
        let over = Charge {
            tokens: 600,
            cost: Money::from_micros(6_000_000),
        };
        let found = reached(&thresholds, &limits, &snap, held, over);
        assert_eq!(found.len(), 4, "{found:?}");
        assert!(
            found
                .iter()
                .any(|r| r.threshold == 1.0 && r.used == 1000 && r.window == Window::TokensPerDay)
        );
        // No limit, or a limit of 0: nothing to alert on.
        let none = Limits {
            tokens_per_day: Some(0),
            ..Limits::default()
        };
        assert_eq!(reached(&thresholds, &none, &snap, held, held), []);
    }

    #[test]
    fn an_alert_names_its_subject_window_and_period() {
        let reached = Reached {
            window: Window::CostPerMonth,
            threshold: 0.8,
            used: 8_123_456,
            limit: 10_000_000,
        };
        let alert = alert(
            &Account::team("research"),
            reached,
            NOW,
            NOW + NANOS_PER_SEC,
        )
        .unwrap_or_else(|| panic!("a team's alert"));
        assert_eq!(
            serde_json::to_value(&alert).unwrap_or_default(),
            serde_json::json!({
                "type": "budget.threshold",
                "subject": {"kind": "team", "name": "research"},
                "window": "cost_per_month",
                "threshold": 0.8,
                "used": 8.123456,
                "limit": 10.0,
                "period_start": "2026-12-01T00:00:00Z",
                "at": "2026-12-05T14:00:01Z",
            })
        );
        let daily = Reached {
            window: Window::TokensPerDay,
            ..reached
        };
        let alert = super::alert(&Account::client("a"), daily, NOW, NOW)
            .unwrap_or_else(|| panic!("a client's alert"));
        assert_eq!(alert.period_start, "2026-12-05T00:00:00Z");
        assert_eq!(alert.used, serde_json::Number::from(8_123_456u64));
        assert_eq!(alert.period_end, NOW + 10 * 3600 * NANOS_PER_SEC);
        assert!(super::alert(&Account::upstream("u"), daily, NOW, NOW).is_none());
    }
}
