//! Budget windows and their arithmetic, independent of where the state lives:
//! per-minute token buckets (GCRA), UTC calendar days and months, the
//! concurrency count, and the one atomic "reserve against every window" step.
//!
//! Every store applies these same functions to a [`ClientState`], so the
//! memory and SQLite stores agree to the nanosecond; the Redis store ports
//! them to one Lua script per operation (to the microsecond) and reads its
//! snapshots back through [`ClientState::snapshot`].
//!
//! Time is a `u64` of nanoseconds since the Unix epoch, taken from a
//! [`Clock`]. The clock follows tokio's clock, so tests pause and advance it
//! and calendar boundaries move with it. Months (their lengths, leap years)
//! come from `jiff`'s proleptic Gregorian calendar in UTC.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jiff::Timestamp;
use jiff::civil::{Date, Time};
use jiff::tz::Offset;

use crate::budget::Limits;
use crate::budget::money::Money;

pub const NANOS_PER_SEC: u64 = 1_000_000_000;
/// The span of the per-minute windows.
pub const MINUTE: u64 = 60 * NANOS_PER_SEC;
/// A UTC day: Unix time counts every day as 86 400 seconds (no leap
/// seconds), so day numbers and midnights are plain division.
const DAY: u64 = 86_400 * NANOS_PER_SEC;

/// Wait suggested when `max_concurrent` is reached: a slot frees up when any
/// in-flight request ends, which Iris cannot predict, so SDKs retry soon.
pub const CONCURRENCY_RETRY: u64 = NANOS_PER_SEC;

/// Wall-clock time in Unix nanoseconds, driven by tokio's clock.
///
/// It reads the system time once and from then on adds tokio's monotonic
/// elapsed time: wall-clock jumps (NTP steps) cannot make a minute window run
/// backwards, and tests with a paused tokio clock control calendar time too.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: tokio::time::Instant,
    origin_unix: u64,
}

impl Clock {
    /// The real time.
    pub fn system() -> Self {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        Self::starting_at(unix)
    }

    /// A clock that reads `unix` now and advances with tokio's clock (tests).
    pub fn starting_at(unix: Duration) -> Self {
        Self {
            origin: tokio::time::Instant::now(),
            origin_unix: u64::try_from(unix.as_nanos()).unwrap_or(u64::MAX),
        }
    }

    /// Unix nanoseconds now.
    pub fn now(&self) -> u64 {
        let elapsed = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.origin_unix.saturating_add(elapsed)
    }
}

/// The budget windows an account may have, in the order they are reported
/// (the Redis scripts number them in this order too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Window {
    RequestsPerMinute,
    TokensPerMinute,
    TokensPerDay,
    TokensPerMonth,
    MaxConcurrent,
    /// Money, in micro-units of the pricing currency, per UTC calendar day.
    CostPerDay,
    /// Money per UTC calendar month.
    CostPerMonth,
}

impl Window {
    pub const ALL: [Window; 7] = [
        Window::RequestsPerMinute,
        Window::TokensPerMinute,
        Window::TokensPerDay,
        Window::TokensPerMonth,
        Window::MaxConcurrent,
        Window::CostPerDay,
        Window::CostPerMonth,
    ];

    /// The config key, also used in `/v1/usage`, metrics and `iris usage`.
    pub fn name(self) -> &'static str {
        match self {
            Window::RequestsPerMinute => "requests_per_minute",
            Window::TokensPerMinute => "tokens_per_minute",
            Window::TokensPerDay => "tokens_per_day",
            Window::TokensPerMonth => "tokens_per_month",
            Window::MaxConcurrent => "max_concurrent",
            Window::CostPerDay => "cost_per_day",
            Window::CostPerMonth => "cost_per_month",
        }
    }

    /// The limit, in the window's unit (requests, tokens, micro-units of money).
    pub fn limit(self, limits: &Limits) -> Option<u64> {
        match self {
            Window::RequestsPerMinute => limits.requests_per_minute,
            Window::TokensPerMinute => limits.tokens_per_minute,
            Window::TokensPerDay => limits.tokens_per_day,
            Window::TokensPerMonth => limits.tokens_per_month,
            Window::MaxConcurrent => limits.max_concurrent,
            Window::CostPerDay => limits.cost_per_day.map(Money::micros),
            Window::CostPerMonth => limits.cost_per_month.map(Money::micros),
        }
    }

    /// Whether the window counts money (micro-units), else requests or tokens.
    pub fn counts_cost(self) -> bool {
        matches!(self, Window::CostPerDay | Window::CostPerMonth)
    }

    /// What `charge` weighs in this window.
    pub fn amount(self, charge: Charge) -> u64 {
        if self.counts_cost() {
            charge.cost.micros()
        } else if self.counts_tokens() {
            charge.tokens
        } else {
            1
        }
    }

    /// Whether the window counts tokens (else requests).
    pub fn counts_tokens(self) -> bool {
        matches!(
            self,
            Window::TokensPerMinute | Window::TokensPerDay | Window::TokensPerMonth
        )
    }
}

/// A per-minute window as a GCRA token bucket: capacity `limit`, refilling
/// `limit` per minute, stored as its theoretical arrival time (TAT): the
/// moment the bucket is full again. `TAT - now` is the time the tokens
/// currently held take to drain, so no timer or periodic refill is needed,
/// costs may vary per request, and unused tokens can be refunded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bucket {
    pub tat: u64,
}

/// Nanoseconds of refill that `amount` units represent for `limit` per minute.
fn drain_time(amount: u64, limit: u64) -> u64 {
    let ns = (u128::from(amount) * u128::from(MINUTE)).div_ceil(u128::from(limit.max(1)));
    u64::try_from(ns).unwrap_or(u64::MAX)
}

impl Bucket {
    /// Units held now (reserved or spent within the last minute's refill).
    pub fn used(&self, limit: u64, now: u64) -> u64 {
        let held = self.tat.saturating_sub(now);
        let units = (u128::from(held) * u128::from(limit)).div_ceil(u128::from(MINUTE));
        u64::try_from(units).unwrap_or(u64::MAX).min(limit)
    }

    /// When the bucket is empty again.
    pub fn reset_at(&self, now: u64) -> u64 {
        self.tat.max(now)
    }

    /// The new TAT if `cost` fits now, else how long until it would.
    fn admit(&self, limit: u64, cost: u64, now: u64) -> Result<u64, u64> {
        let tat = self.tat.max(now).saturating_add(drain_time(cost, limit));
        let horizon = now.saturating_add(MINUTE);
        if tat <= horizon {
            Ok(tat)
        } else {
            Err(tat - horizon)
        }
    }

    /// Charges `amount` more without a limit check (settling above the estimate).
    fn charge(&mut self, limit: u64, amount: u64, now: u64) {
        self.tat = self.tat.max(now).saturating_add(drain_time(amount, limit));
    }

    /// Gives back `amount`; what already drained is not given twice.
    fn refund(&mut self, limit: u64, amount: u64, now: u64) {
        if self.tat > now {
            self.tat = self.tat.saturating_sub(drain_time(amount, limit)).max(now);
        }
    }
}

/// A calendar window: which period it counts, and the tokens used in it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Calendar {
    /// Day: days since 1970-01-01. Month: `year * 12 + month - 1`.
    pub period: u32,
    pub used: u64,
}

impl Calendar {
    /// Tokens used in `period` (nothing yet if the stored period is older).
    pub fn used_in(&self, period: u32) -> u64 {
        if self.period == period { self.used } else { 0 }
    }

    fn roll(&mut self, period: u32) {
        if self.period != period {
            *self = Calendar { period, used: 0 };
        }
    }
}

/// The UTC day and month containing an instant, with their ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Periods {
    pub day: u32,
    /// Unix nanoseconds of the next midnight UTC.
    pub day_end: u64,
    pub month: u32,
    /// Unix nanoseconds of the first of the next month, 00:00 UTC.
    pub month_end: u64,
}

impl Periods {
    /// When a calendar window's period ends (the day's for a daily window,
    /// else the month's).
    pub fn end_of(&self, window: Window) -> u64 {
        match window {
            Window::TokensPerDay | Window::CostPerDay => self.day_end,
            _ => self.month_end,
        }
    }

    pub fn at(now: u64) -> Self {
        let day = now / DAY;
        // Every u64 of nanoseconds (up to the year 2554) is inside jiff's
        // range, so the fallback is never taken.
        let (month, month_end) = month_at(now).unwrap_or((u32::MAX, u64::MAX));
        Self {
            day: u32::try_from(day).unwrap_or(u32::MAX),
            day_end: (day + 1).saturating_mul(DAY),
            month,
            month_end,
        }
    }
}

/// The UTC date of Unix nanoseconds (whole seconds first: the sub-second
/// part never changes the date).
fn utc_date(unix_ns: u64) -> Option<Date> {
    let secs = i64::try_from(unix_ns / NANOS_PER_SEC).ok()?;
    Some(
        Offset::UTC
            .to_datetime(Timestamp::from_second(secs).ok()?)
            .date(),
    )
}

/// The month containing `now` as `year * 12 + month - 1`, and the Unix
/// nanoseconds of the first of the next month, 00:00 UTC.
fn month_at(now: u64) -> Option<(u32, u64)> {
    let date = utc_date(now)?;
    let next = date.last_of_month().tomorrow().ok()?;
    let end = Offset::UTC
        .to_timestamp(next.to_datetime(Time::midnight()))
        .ok()?
        .as_second();
    let month = i32::from(date.year()) * 12 + i32::from(date.month()) - 1;
    Some((
        u32::try_from(month).ok()?,
        u64::try_from(end).ok()?.saturating_mul(NANOS_PER_SEC),
    ))
}

/// When the period of the calendar window `window` that holds `now`
/// began (Unix nanoseconds): its UTC midnight, or the first of its month.
pub fn period_start(window: Window, now: u64) -> u64 {
    match window {
        Window::TokensPerDay | Window::CostPerDay => now / DAY * DAY,
        _ => month_start(now).unwrap_or(0),
    }
}

/// The first of the month holding `now`, 00:00 UTC, in Unix nanoseconds.
fn month_start(now: u64) -> Option<u64> {
    let first = utc_date(now)?.first_of_month();
    let start = Offset::UTC
        .to_timestamp(first.to_datetime(Time::midnight()))
        .ok()?
        .as_second();
    Some(u64::try_from(start).ok()?.saturating_mul(NANOS_PER_SEC))
}

/// `YYYY-MM-DDTHH:MM:SSZ` for Unix nanoseconds.
pub fn format_utc(unix_ns: u64) -> String {
    i64::try_from(unix_ns / NANOS_PER_SEC)
        .ok()
        .and_then(|secs| Timestamp::from_second(secs).ok())
        .map_or_else(
            // Unreachable for a u64 of nanoseconds (see Periods::at).
            || format!("{unix_ns} ns after 1970-01-01T00:00:00Z"),
            |at| at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
        )
}

/// What a reservation charges every window of its accounts, or what a
/// settlement replaces it by.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Charge {
    pub tokens: u64,
    pub cost: Money,
}

impl Charge {
    pub fn tokens(tokens: u64) -> Self {
        Self {
            tokens,
            cost: Money::ZERO,
        }
    }
}

/// Everything a store keeps for one account.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientState {
    pub requests: Bucket,
    pub tokens: Bucket,
    pub day: Calendar,
    pub month: Calendar,
    /// Money (micro-units) in the day and the month.
    pub cost_day: Calendar,
    pub cost_month: Calendar,
    /// Requests admitted and not yet settled. Not persisted: after a restart
    /// nothing is in flight.
    pub in_flight: u64,
}

/// What a reservation holds, so that settling can give back exactly that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hold {
    pub tokens: u64,
    pub cost: Money,
    /// The day and month the tokens were charged to: settling after midnight
    /// corrects the day of admission, not the new one.
    pub day: u32,
    pub month: u32,
    /// Which reservation this is, for a store that tracks each one (the
    /// Redis store's leases); 0 where the store only counts them.
    pub lease: u64,
}

/// Why a reservation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A short window is full: retry after `wait` nanoseconds.
    RateLimited { window: Window, wait: u64 },
    /// A daily or monthly budget is spent until `reset_at` (Unix nanoseconds).
    Exhausted { window: Window, reset_at: u64 },
    /// The request alone needs more than the whole window (`amount` in the
    /// window's unit): retrying never helps.
    TooLarge {
        window: Window,
        limit: u64,
        amount: u64,
    },
}

impl Refusal {
    pub fn window(&self) -> Window {
        match *self {
            Refusal::RateLimited { window, .. }
            | Refusal::Exhausted { window, .. }
            | Refusal::TooLarge { window, .. } => window,
        }
    }

    /// Which refusal to report when several windows refuse: the one the
    /// client must wait longest for (a spent quota before a rate limit), so
    /// that a retry after it can succeed.
    pub(crate) fn severity(&self) -> (u8, u64) {
        match *self {
            Refusal::TooLarge { .. } => (2, 0),
            Refusal::Exhausted { reset_at, .. } => (1, reset_at),
            Refusal::RateLimited { wait, .. } => (0, wait),
        }
    }
}

/// One window's state as reported in headers, `/v1/usage` and `iris usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowStatus {
    pub window: Window,
    /// `None`: not limited (calendar windows and concurrency are counted anyway).
    pub limit: Option<u64>,
    pub used: u64,
    /// When `used` is back to zero (Unix nanoseconds); `None` for concurrency.
    pub reset_at: Option<u64>,
}

impl WindowStatus {
    pub fn remaining(&self) -> Option<u64> {
        self.limit.map(|limit| limit.saturating_sub(self.used))
    }
}

/// A client's windows at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub now: u64,
    /// In [`Window::ALL`] order.
    pub windows: [WindowStatus; 7],
}

impl Snapshot {
    pub fn get(&self, window: Window) -> &WindowStatus {
        &self.windows[window as usize]
    }

    /// The windows the `x-ratelimit-*` headers describe: the token window
    /// with the least remaining (the minute, day or month budget, whichever
    /// will refuse first) and the requests-per-minute limit, each if limited.
    pub fn headline(&self) -> (Option<&WindowStatus>, Option<&WindowStatus>) {
        let tokens = [
            Window::TokensPerMinute,
            Window::TokensPerDay,
            Window::TokensPerMonth,
        ]
        .into_iter()
        .map(|w| self.get(w))
        .filter(|w| w.limit.is_some())
        .min_by_key(|w| (w.remaining(), w.limit));
        let requests = Some(self.get(Window::RequestsPerMinute)).filter(|w| w.limit.is_some());
        (tokens, requests)
    }

    /// Windows worth reporting: every limited one, plus the day and month
    /// token totals and concurrency, which are counted even without a limit
    /// (cost windows only when limited: without prices they say nothing).
    pub fn reported(&self) -> impl Iterator<Item = &WindowStatus> {
        self.windows.iter().filter(|w| {
            w.limit.is_some()
                || matches!(
                    w.window,
                    Window::TokensPerDay | Window::TokensPerMonth | Window::MaxConcurrent
                )
        })
    }
}

impl ClientState {
    /// Reserves `charge`, one request and one concurrency slot against every
    /// window, or changes nothing and says why not.
    pub fn reserve(&mut self, limits: &Limits, charge: Charge, now: u64) -> Result<Hold, Refusal> {
        let periods = Periods::at(now);
        self.roll(&periods);

        let mut refusal: Option<Refusal> = None;
        let mut refuse = |r: Refusal| {
            if refusal.is_none_or(|worst| r.severity() > worst.severity()) {
                refusal = Some(r);
            }
        };

        if let Some(limit) = limits.max_concurrent
            && self.in_flight >= limit
        {
            refuse(Refusal::RateLimited {
                window: Window::MaxConcurrent,
                wait: CONCURRENCY_RETRY,
            });
        }
        let mut requests_tat = None;
        if let Some(limit) = limits.requests_per_minute {
            match self.requests.admit(limit, 1, now) {
                Ok(tat) => requests_tat = Some(tat),
                Err(wait) => refuse(Refusal::RateLimited {
                    window: Window::RequestsPerMinute,
                    wait,
                }),
            }
        }
        let tokens = charge.tokens;
        let mut tokens_tat = None;
        if let Some(limit) = limits.tokens_per_minute {
            if tokens > limit {
                refuse(Refusal::TooLarge {
                    window: Window::TokensPerMinute,
                    limit,
                    amount: tokens,
                });
            } else {
                match self.tokens.admit(limit, tokens, now) {
                    Ok(tat) => tokens_tat = Some(tat),
                    Err(wait) => refuse(Refusal::RateLimited {
                        window: Window::TokensPerMinute,
                        wait,
                    }),
                }
            }
        }
        for (window, calendar) in self.calendars() {
            let Some(limit) = window.limit(limits) else {
                continue;
            };
            let amount = window.amount(charge);
            if amount > limit {
                refuse(Refusal::TooLarge {
                    window,
                    limit,
                    amount,
                });
            } else if calendar.used.saturating_add(amount) > limit {
                refuse(Refusal::Exhausted {
                    window,
                    reset_at: periods.end_of(window),
                });
            }
        }

        if let Some(refusal) = refusal {
            return Err(refusal);
        }
        if let Some(tat) = requests_tat {
            self.requests.tat = tat;
        }
        if let Some(tat) = tokens_tat {
            self.tokens.tat = tat;
        }
        for (window, calendar) in self.calendars_mut() {
            calendar.used = calendar.used.saturating_add(window.amount(charge));
        }
        self.in_flight += 1;
        Ok(Hold {
            tokens,
            cost: charge.cost,
            day: periods.day,
            month: periods.month,
            lease: 0,
        })
    }

    /// Starts the calendar windows' periods afresh where `periods` is newer.
    fn roll(&mut self, periods: &Periods) {
        self.day.roll(periods.day);
        self.month.roll(periods.month);
        self.cost_day.roll(periods.day);
        self.cost_month.roll(periods.month);
    }

    /// The calendar windows, each with its state.
    fn calendars(&self) -> [(Window, &Calendar); 4] {
        [
            (Window::TokensPerDay, &self.day),
            (Window::TokensPerMonth, &self.month),
            (Window::CostPerDay, &self.cost_day),
            (Window::CostPerMonth, &self.cost_month),
        ]
    }

    fn calendars_mut(&mut self) -> [(Window, &mut Calendar); 4] {
        [
            (Window::TokensPerDay, &mut self.day),
            (Window::TokensPerMonth, &mut self.month),
            (Window::CostPerDay, &mut self.cost_day),
            (Window::CostPerMonth, &mut self.cost_month),
        ]
    }

    /// Replaces what `hold` reserved by `actual` and frees its concurrency
    /// slot. The request itself stays counted.
    pub fn settle(&mut self, limits: &Limits, hold: &Hold, actual: Charge, now: u64) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if let Some(limit) = limits.tokens_per_minute {
            if actual.tokens > hold.tokens {
                self.tokens.charge(limit, actual.tokens - hold.tokens, now);
            } else {
                self.tokens.refund(limit, hold.tokens - actual.tokens, now);
            }
        }
        let held = Charge {
            tokens: hold.tokens,
            cost: hold.cost,
        };
        for (window, calendar) in self.calendars_mut() {
            let period = if matches!(window, Window::TokensPerDay | Window::CostPerDay) {
                hold.day
            } else {
                hold.month
            };
            if calendar.period == period {
                calendar.used = calendar
                    .used
                    .saturating_sub(window.amount(held))
                    .saturating_add(window.amount(actual));
            }
        }
    }

    /// The windows as they stand at `now`.
    pub fn snapshot(&self, limits: &Limits, now: u64) -> Snapshot {
        let periods = Periods::at(now);
        let bucket = |window: Window, bucket: &Bucket| {
            let limit = window.limit(limits);
            WindowStatus {
                window,
                limit,
                used: limit.map_or(0, |l| bucket.used(l, now)),
                reset_at: Some(bucket.reset_at(now)),
            }
        };
        let calendar = |window: Window, calendar: &Calendar| {
            let period = if matches!(window, Window::TokensPerDay | Window::CostPerDay) {
                periods.day
            } else {
                periods.month
            };
            WindowStatus {
                window,
                limit: window.limit(limits),
                used: calendar.used_in(period),
                reset_at: Some(periods.end_of(window)),
            }
        };
        Snapshot {
            now,
            windows: [
                bucket(Window::RequestsPerMinute, &self.requests),
                bucket(Window::TokensPerMinute, &self.tokens),
                calendar(Window::TokensPerDay, &self.day),
                calendar(Window::TokensPerMonth, &self.month),
                WindowStatus {
                    window: Window::MaxConcurrent,
                    limit: limits.max_concurrent,
                    used: self.in_flight,
                    reset_at: None,
                },
                calendar(Window::CostPerDay, &self.cost_day),
                calendar(Window::CostPerMonth, &self.cost_month),
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = NANOS_PER_SEC;

    /// Unix nanoseconds of a UTC date and time.
    fn at(year: i16, month: i8, day: i8, hms: (i8, i8, i8)) -> u64 {
        let civil = jiff::civil::datetime(year, month, day, hms.0, hms.1, hms.2, 0);
        let secs = Offset::UTC
            .to_timestamp(civil)
            .expect("in range")
            .as_second();
        u64::try_from(secs).expect("after 1970") * SEC
    }

    /// The day number of a UTC date.
    fn day_of(year: i16, month: i8, day: i8) -> u32 {
        Periods::at(at(year, month, day, (0, 0, 0))).day
    }

    fn limits() -> Limits {
        Limits::default()
    }

    #[test]
    fn day_numbers_count_every_date_across_centuries_and_leap_days() {
        // Every midnight the u64 clock can name (1970 to 2554): the day
        // number is the count of days, and the month changes exactly at the
        // previous month's end and nowhere else.
        let mut month = Periods::at(0);
        for day in 0..=u64::MAX / DAY {
            let periods = Periods::at(day * DAY);
            assert_eq!(u64::from(periods.day), day);
            if periods.month == month.month {
                assert_eq!(periods.month_end, month.month_end, "day {day}");
            } else {
                assert_eq!(periods.month, month.month + 1, "day {day}");
                assert_eq!(day * DAY, month.month_end, "day {day}");
                month = periods;
            }
        }
        assert_eq!(month.month, 2554 * 12 + 6, "July 2554");
        assert_eq!((Periods::at(0).day, Periods::at(0).month), (0, 1970 * 12));
        assert_eq!(
            format_utc(at(2024, 2, 29, (0, 0, 0))),
            "2024-02-29T00:00:00Z"
        );
        assert_eq!(day_of(2024, 3, 1) - day_of(2024, 2, 28), 2);
        assert_eq!(day_of(2023, 3, 1) - day_of(2023, 2, 28), 1);
        assert_eq!(day_of(2100, 3, 1) - day_of(2100, 2, 28), 1);
        assert_eq!(day_of(2000, 3, 1) - day_of(2000, 2, 28), 2);
    }

    /// Day and month boundaries against Unix times worked out apart from
    /// this code (GNU `date -u -d DATE +%s`), at the units the stores keep:
    /// nanoseconds (memory, SQLite), microseconds (Redis's Lua),
    /// milliseconds (the spend log).
    #[test]
    fn periods_at_month_ends_leap_days_and_year_ends() {
        const MS: u64 = 1_000_000;
        const US: u64 = 1_000;
        let s = |secs: u64| secs * SEC;
        let month = |year: u32, month: u32| year * 12 + month - 1;
        #[rustfmt::skip]
        let table: [(&str, u64, u32, u64, u32, u64); 15] = [
            // (what, instant, day, day_end, month, month_end)
            ("the epoch", 0, 0, s(86_400), month(1970, 1), s(2_678_400)),
            ("1 ns before February 1970", s(2_678_400) - 1, 30, s(2_678_400), month(1970, 1), s(2_678_400)),
            ("1 us before 2028-02-29", s(1_835_395_200) - US, 21_242, s(1_835_395_200), month(2028, 2), s(1_835_481_600)),
            ("1 ms before 2028-02-29", s(1_835_395_200) - MS, 21_242, s(1_835_395_200), month(2028, 2), s(1_835_481_600)),
            ("2028-02-29, a leap day", s(1_835_395_200), 21_243, s(1_835_481_600), month(2028, 2), s(1_835_481_600)),
            ("the last ns of 2028-02-29", s(1_835_481_600) - 1, 21_243, s(1_835_481_600), month(2028, 2), s(1_835_481_600)),
            ("2028-03-01", s(1_835_481_600), 21_244, s(1_835_568_000), month(2028, 3), s(1_838_160_000)),
            ("2027-02-28 noon, a common year", s(1_803_772_800 + 43_200), 20_877, s(1_803_859_200), month(2027, 2), s(1_803_859_200)),
            ("the last ns of 2027", s(1_830_297_600) - 1, 21_183, s(1_830_297_600), month(2027, 12), s(1_830_297_600)),
            ("2028-01-01", s(1_830_297_600), 21_184, s(1_830_384_000), month(2028, 1), s(1_832_976_000)),
            ("the last ms of April 2025", s(1_746_057_600) - MS, 20_208, s(1_746_057_600), month(2025, 4), s(1_746_057_600)),
            ("the last second of January 2025", s(1_738_368_000 - 1), 20_119, s(1_738_368_000), month(2025, 1), s(1_738_368_000)),
            ("2100-02-28, no leap day in 2100", s(4_107_456_000) + 1, 47_540, s(4_107_542_400), month(2100, 2), s(4_107_542_400)),
            ("2000-02-29, a leap day in 2000", s(951_782_400), 11_016, s(951_868_800), month(2000, 2), s(951_868_800)),
            ("u64::MAX, 2554-07-21: ends saturate", u64::MAX, 213_503, u64::MAX, month(2554, 7), u64::MAX),
        ];
        for (what, instant, day, day_end, month, month_end) in table {
            assert_eq!(
                Periods::at(instant),
                Periods {
                    day,
                    day_end,
                    month,
                    month_end
                },
                "{what}"
            );
        }
        assert_eq!(format_utc(s(1_835_481_600) - 1), "2028-02-29T23:59:59Z");
        assert_eq!(format_utc(s(1_830_297_600) - MS), "2027-12-31T23:59:59Z");
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(u64::MAX), "2554-07-21T23:34:33Z");
    }

    #[test]
    fn periods_end_at_utc_midnight_and_month_start() {
        let p = Periods::at(at(2024, 12, 31, (23, 59, 59)));
        assert_eq!(p.day_end, at(2025, 1, 1, (0, 0, 0)));
        assert_eq!(p.month_end, at(2025, 1, 1, (0, 0, 0)));
        let next = Periods::at(at(2025, 1, 1, (0, 0, 0)));
        assert_eq!(next.day, p.day + 1);
        assert_eq!(next.month, p.month + 1);

        // February in a leap year runs to the 29th, otherwise to the 28th.
        let leap = Periods::at(at(2024, 2, 28, (12, 0, 0)));
        assert_eq!(leap.month_end, at(2024, 3, 1, (0, 0, 0)));
        assert_eq!(leap.day_end, at(2024, 2, 29, (0, 0, 0)));
        assert_eq!(
            Periods::at(at(2024, 2, 29, (23, 0, 0))).month,
            leap.month,
            "Feb 29 is still February"
        );
        let common = Periods::at(at(2023, 2, 28, (23, 59, 59)));
        assert_eq!(common.day_end, at(2023, 3, 1, (0, 0, 0)));
        assert_eq!(common.month_end, common.day_end);
        assert_eq!(
            format_utc(at(2024, 2, 29, (7, 8, 9))),
            "2024-02-29T07:08:09Z"
        );
    }

    #[test]
    fn bucket_admits_a_full_minute_then_refills_gradually() {
        let limits = Limits {
            tokens_per_minute: Some(600),
            ..limits()
        };
        let mut state = ClientState::default();
        let t0 = 1_000 * SEC;
        let hold = state
            .reserve(&limits, Charge::tokens(600), t0)
            .expect("the whole minute fits");
        assert_eq!(hold.tokens, 600);
        let refused = state
            .reserve(&limits, Charge::tokens(10), t0)
            .expect_err("bucket is full");
        assert_eq!(
            refused,
            Refusal::RateLimited {
                window: Window::TokensPerMinute,
                wait: SEC
            },
            "10 of 600 per minute refill in one second"
        );
        // Settle so the concurrency slot is free; the tokens stay charged.
        state.settle(&limits, &hold, Charge::tokens(600), t0);
        assert!(
            state
                .reserve(&limits, Charge::tokens(10), t0 + SEC - 1)
                .is_err()
        );
        assert!(state.reserve(&limits, Charge::tokens(10), t0 + SEC).is_ok());
        assert_eq!(
            state
                .snapshot(&limits, t0 + SEC)
                .get(Window::TokensPerMinute)
                .used,
            600
        );
        assert_eq!(
            state
                .snapshot(&limits, t0 + 31 * SEC)
                .get(Window::TokensPerMinute)
                .used,
            300
        );
    }

    #[test]
    fn refunds_return_unused_tokens_and_overruns_are_charged() {
        let limits = Limits {
            tokens_per_minute: Some(1000),
            tokens_per_day: Some(5000),
            ..limits()
        };
        let mut state = ClientState::default();
        let now = 10 * SEC;
        let hold = state
            .reserve(&limits, Charge::tokens(800), now)
            .expect("fits");
        state.settle(&limits, &hold, Charge::tokens(100), now);
        let snap = state.snapshot(&limits, now);
        assert_eq!(snap.get(Window::TokensPerMinute).used, 100);
        assert_eq!(snap.get(Window::TokensPerDay).used, 100);
        assert_eq!(snap.get(Window::MaxConcurrent).used, 0);

        let hold = state
            .reserve(&limits, Charge::tokens(100), now)
            .expect("fits");
        state.settle(&limits, &hold, Charge::tokens(1500), now);
        let snap = state.snapshot(&limits, now);
        assert_eq!(
            snap.get(Window::TokensPerMinute).used,
            1000,
            "capped at the limit"
        );
        assert_eq!(snap.get(Window::TokensPerDay).used, 1600);
        // Overspent: the minute window is blocked until 600 tokens' worth drained.
        let refused = state
            .reserve(&limits, Charge::tokens(1), now)
            .expect_err("overspent");
        assert!(matches!(refused, Refusal::RateLimited { wait, .. } if wait > 36 * SEC));
    }

    #[test]
    fn a_refund_never_gives_back_what_already_drained() {
        let limits = Limits {
            tokens_per_minute: Some(60),
            ..limits()
        };
        let mut state = ClientState::default();
        let hold = state.reserve(&limits, Charge::tokens(60), 0).expect("fits");
        // 50 s later only 10 tokens are still held; refunding all 60 empties the bucket.
        state.settle(&limits, &hold, Charge::tokens(0), 50 * SEC);
        assert_eq!(state.tokens.tat, 50 * SEC);
        assert!(state.reserve(&limits, Charge::tokens(60), 50 * SEC).is_ok());
        assert!(state.reserve(&limits, Charge::tokens(1), 50 * SEC).is_err());
    }

    #[test]
    fn requests_per_minute_is_gcra() {
        let limits = Limits {
            requests_per_minute: Some(3),
            ..limits()
        };
        let mut state = ClientState::default();
        for _ in 0..3 {
            let hold = state
                .reserve(&limits, Charge::tokens(5), 0)
                .expect("within the burst");
            state.settle(&limits, &hold, Charge::tokens(5), 0);
        }
        assert_eq!(
            state.reserve(&limits, Charge::tokens(5), 0),
            Err(Refusal::RateLimited {
                window: Window::RequestsPerMinute,
                wait: 20 * SEC
            })
        );
        assert!(state.reserve(&limits, Charge::tokens(5), 20 * SEC).is_ok());
    }

    #[test]
    fn calendar_budgets_reset_at_midnight_and_month_start() {
        let limits = Limits {
            tokens_per_day: Some(100),
            tokens_per_month: Some(150),
            ..limits()
        };
        let mut state = ClientState::default();
        let eve = at(2024, 12, 31, (23, 59, 0));
        let hold = state
            .reserve(&limits, Charge::tokens(100), eve)
            .expect("fits");
        state.settle(&limits, &hold, Charge::tokens(100), eve);
        assert_eq!(
            state.reserve(&limits, Charge::tokens(1), eve),
            Err(Refusal::Exhausted {
                window: Window::TokensPerDay,
                reset_at: at(2025, 1, 1, (0, 0, 0))
            })
        );
        let new_year = at(2025, 1, 1, (0, 0, 0));
        let hold = state
            .reserve(&limits, Charge::tokens(100), new_year)
            .expect("new day, new month");
        state.settle(&limits, &hold, Charge::tokens(100), new_year);

        // A day's budget left, but the month has only 50 more.
        let mut state = ClientState::default();
        let mid_month = at(2024, 2, 28, (10, 0, 0));
        let hold = state
            .reserve(&limits, Charge::tokens(100), mid_month)
            .expect("fits");
        state.settle(&limits, &hold, Charge::tokens(100), mid_month);
        let next_day = at(2024, 2, 29, (10, 0, 0));
        let refused = state
            .reserve(&limits, Charge::tokens(60), next_day)
            .expect_err("month has 50 left");
        assert_eq!(
            refused,
            Refusal::Exhausted {
                window: Window::TokensPerMonth,
                reset_at: at(2024, 3, 1, (0, 0, 0))
            }
        );
        assert!(state.reserve(&limits, Charge::tokens(50), next_day).is_ok());
        assert!(
            state
                .reserve(&limits, Charge::tokens(50), at(2024, 3, 1, (0, 0, 0)))
                .is_ok()
        );
    }

    #[test]
    fn settling_after_midnight_corrects_the_day_of_admission() {
        let limits = Limits {
            tokens_per_day: Some(1000),
            ..limits()
        };
        let mut state = ClientState::default();
        let before = at(2024, 6, 30, (23, 59, 59));
        let hold = state
            .reserve(&limits, Charge::tokens(500), before)
            .expect("fits");
        let after = at(2024, 7, 1, (0, 0, 5));
        let next = state
            .reserve(&limits, Charge::tokens(10), after)
            .expect("new day");
        state.settle(&limits, &hold, Charge::tokens(20), after);
        assert_eq!(
            state
                .snapshot(&limits, after)
                .get(Window::TokensPerDay)
                .used,
            10
        );
        state.settle(&limits, &next, Charge::tokens(10), after);
        assert_eq!(state.in_flight, 0);
    }

    #[test]
    fn a_request_larger_than_a_window_is_refused_outright() {
        let limits = Limits {
            tokens_per_minute: Some(1000),
            tokens_per_day: Some(500),
            ..limits()
        };
        let mut state = ClientState::default();
        assert_eq!(
            state.reserve(&limits, Charge::tokens(600), 0),
            Err(Refusal::TooLarge {
                window: Window::TokensPerDay,
                limit: 500,
                amount: 600
            })
        );
        assert_eq!(
            (state.day.used, state.tokens.tat, state.in_flight),
            (0, 0, 0)
        );
    }

    #[test]
    fn refusal_changes_nothing_and_reports_the_longest_wait() {
        let limits = Limits {
            requests_per_minute: Some(10),
            tokens_per_minute: Some(100),
            tokens_per_day: Some(150),
            max_concurrent: Some(1),
            ..limits()
        };
        let mut state = ClientState::default();
        let now = at(2024, 5, 5, (5, 5, 5));
        let hold = state
            .reserve(&limits, Charge::tokens(100), now)
            .expect("fits");
        let before = state;
        // Concurrency, the minute bucket and the day all refuse: the day wins.
        let refused = state
            .reserve(&limits, Charge::tokens(60), now)
            .expect_err("refused");
        assert_eq!(refused.window(), Window::TokensPerDay);
        assert_eq!(state, before, "a refusal reserves nothing");
        state.settle(&limits, &hold, Charge::tokens(100), now);
        let refused = state
            .reserve(&limits, Charge::tokens(10), now)
            .expect_err("minute is full");
        assert_eq!(refused.window(), Window::TokensPerMinute);
    }

    #[test]
    fn concurrency_is_limited_and_freed_on_settle() {
        let limits = Limits {
            max_concurrent: Some(2),
            ..limits()
        };
        let mut state = ClientState::default();
        let a = state.reserve(&limits, Charge::tokens(1), 0).expect("1st");
        let _b = state.reserve(&limits, Charge::tokens(1), 0).expect("2nd");
        assert_eq!(
            state.reserve(&limits, Charge::tokens(1), 0),
            Err(Refusal::RateLimited {
                window: Window::MaxConcurrent,
                wait: CONCURRENCY_RETRY
            })
        );
        state.settle(&limits, &a, Charge::tokens(0), 0);
        assert!(state.reserve(&limits, Charge::tokens(1), 0).is_ok());
    }
}
