//! The shared store: budgets in Redis, so several Iris instances behind a
//! load balancer enforce one budget per client.
//!
//! **Atomic.** Each operation is one Lua script, run by Redis as one step:
//! `reserve` checks every window and charges them all or none, `settle`
//! corrects them, `snapshot` reads. No interleaving of instances can
//! overspend, and each operation is one round trip (`EVALSHA`; on a
//! `NOSCRIPT` the script is sent whole with `EVAL`, which caches it, so a
//! flushed script cache or a freshly promoted replica heals itself).
//!
//! **Keys.** One account's state is eight keys, all carrying the account in
//! a hash tag so they share one Redis Cluster slot and every script names
//! all its keys in `KEYS`:
//!
//! | key | type | holds | expires |
//! |---|---|---|---|
//! | `{prefix}:v1:{account}:rpm` | string | requests-per-minute GCRA TAT (µs) | when the bucket is empty again |
//! | `{prefix}:v1:{account}:tpm` | string | tokens-per-minute GCRA TAT (µs) | the same |
//! | `{prefix}:v1:{account}:day` | hash `p`, `u` | UTC day number, tokens used in it | an hour after that day ends |
//! | `{prefix}:v1:{account}:month` | hash `p`, `u` | month number, tokens used in it | an hour after that month ends |
//! | `{prefix}:v1:{account}:leases` | sorted set | one member per request in flight, scored by its lease's end (µs) | with its last lease |
//! | `{prefix}:v1:{account}:expired` | sorted set | leases that ended unsettled, scored by when that was noticed (µs), for a day | a day after the last |
//! | `{prefix}:v1:{account}:cday` | hash `p`, `u` | UTC day number, money used in it (micro-units) | an hour after that day ends |
//! | `{prefix}:v1:{account}:cmonth` | hash `p`, `u` | month number, money used in it | an hour after that month ends |
//!
//! `{account}` is the account's key ([`Account::key`]: a client's name,
//! `\u{1}upstream/` and an upstream's name for its pacing, `\u{1}team/` and a
//! team's name), percent-encoded (anything but `A-Z a-z 0-9 . _ ~ -`), so a
//! `{`, `}` or `:` in a name cannot break the hash tag or the layout: `{b}`,
//! `{%01upstream%2Fopenai}`.
//!
//! A team member's keys are kept in its team's slot, since one script
//! reserves against both: `{prefix}:v1:{%01team%2Fresearch}alice:rpm` (the
//! team in the hash tag, the client after it). So in Redis a client that
//! joins, leaves or changes team starts its own windows afresh (its team's
//! are unaffected); the embedded stores keep them.
//!
//! The two money keys came after the first six, within `v1`: an instance
//! of a version without them neither reads nor writes them (it charges no
//! money), and nothing else changed meaning.
//!
//! Deployment health shared between instances ([`SharedHealth`]) is two
//! keys per deployment, `{prefix}:v1:{health/<deployment>}:fails` (failures
//! in the window) and `:cooldown` (set while it cools down).
//!
//! A budget alert's claim ([`AlertClaims`]) is one key,
//! `{prefix}:v1:{alert/<claim key>}`, set with `NX` by the instance that
//! sends the alert and expiring an hour after the alert's period ends.
//!
//! **Versions.** `v1` is the layout: the keys above and what their values
//! mean. Scripts may change freely within a layout (old and new scripts run
//! side by side during a rolling upgrade: each instance loads its own by its
//! SHA, and both read and write the same state the same way). A change to
//! the layout (a key's type, unit or meaning) must bump the version, so that
//! a newer instance never misreads an older one's keys; during such a
//! rollout the two versions count separately.
//!
//! **Time.** Scripts take "now" from Redis's `TIME`, so every instance
//! agrees on the minute buckets and on when a UTC day or month ends, however
//! their clocks drift; the `now` the [`Store`] trait passes in is ignored
//! (only tests pass it through, with [`RedisClock::Caller`], to cross
//! midnight on purpose). Calendar periods are computed in Lua by a port of
//! Hinnant's date algorithms (Lua has no calendar; `window.rs` uses jiff),
//! which the tests check against `window.rs` at every month boundary.
//!
//! **Leases.** Each reservation adds a member (a fresh random id, carried in
//! its [`Hold`]) to the client's lease set, scored `now + lease`. `settle`
//! removes it. A reservation never settled (its instance died, or the
//! settle could not reach Redis) expires: the next `reserve` drops leases
//! past their end, freeing their concurrency slots. Their tokens stay
//! charged at the reservation (the safe side, as the SQLite store does after
//! a crash), and the lease moves to the client's `expired` set: a late
//! settle of it still corrects the tokens, once (expiry gave none back).
//!
//! **Answers lost.** A reservation whose reply was lost (a timeout, a
//! dropped connection, a primary failing over) may still have run: a cancel
//! is sent behind it, which gives it back only if its lease exists, so its
//! slot is not held for a whole lease. Settles and cancels are idempotent (a
//! lease neither live nor expired has nothing left to settle), so they are
//! sent again until Redis answers, for as long as the lease lasts: a
//! settlement caught in a failover lands on the new primary. A reservation
//! is never sent twice.
//!
//! **Unavailable.** Every operation is bounded by `store.timeout_ms`
//! (connecting included), so a dead Redis fails a request fast, and
//! [`crate::budget::Budgets`] then rejects or counts locally as
//! `store.on_unavailable` says. The connection is shared by every request
//! ([`RedisConnection`]); it reconnects on the next operation after a
//! failure, so Iris recovers when Redis does. Redis 5 or newer (scripts
//! that call `TIME` before writing).
//!
//! **Shutdown.** Settlements run detached from their requests; `flush` waits
//! for those still on their way, so a draining instance exits with every
//! finished request settled.
//!
//! **Cluster and Sentinel.** `store.url`'s scheme picks the deployment
//! (`redis+cluster://`, `redis+sentinel://`: see [`Deployment`]). Each script
//! names all its keys in `KEYS`, one hash tag per call, so in a Cluster it
//! runs whole on the primary of that slot. A script is resent only when
//! Redis answered that it did not run it (`MOVED`, `NOSCRIPT`, …), never
//! after a lost answer, so a failover cannot charge a request twice (see
//! [`connection`](self::connection)).

use std::sync::Arc;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::FromRedisValue;
use tokio_util::task::TaskTracker;

mod connection;
mod url;

pub use self::connection::{Lua, LuaCall, RedisConnection};
pub use self::url::Deployment;

use super::{Parties, Party, Refused, worst};
use super::{Reserved, Store, StoreError, StoreFuture};
use crate::alerts::{AlertClaims, ClaimError, ClaimFuture};
use crate::budget::money::Money;
use crate::budget::window::{
    Bucket, CONCURRENCY_RETRY, Calendar, Charge, ClientState, Hold, Periods, Refusal, Snapshot,
    Window,
};
use crate::budget::{Account, Limits};
use crate::shared_health::{ShareError, ShareFuture, SharedHealth};

/// The key layout version (see the module documentation before changing it).
pub const LAYOUT: &str = "v1";

const COMMON: &str = include_str!("lua/common.lua");

fn script(body: &str) -> Lua {
    Lua::new(&format!("{COMMON}\n{body}"))
}

static RESERVE: LazyLock<Lua> = LazyLock::new(|| script(include_str!("lua/reserve.lua")));
static SETTLE: LazyLock<Lua> = LazyLock::new(|| script(include_str!("lua/settle.lua")));
/// A deployment's failure, counted for every instance: `KEYS[1]` counts
/// failures in a window of `ARGV[1]` ms; at `ARGV[2]` of them, `KEYS[2]`
/// (the cooldown) is set for `ARGV[3]` ms unless it runs longer already.
static SHARE_FAILURE: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r"
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
if n >= tonumber(ARGV[2]) then
  if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[3]) then
    redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
  end
  redis.call('DEL', KEYS[1])
end
return n
",
    )
});

/// A cooldown of `ARGV[1]` ms on `KEYS[1]`, unless it runs longer already.
static SHARE_COOLDOWN: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r"
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
end
return 1
",
    )
});

static SNAPSHOT: LazyLock<Lua> = LazyLock::new(|| script(include_str!("lua/snapshot.lua")));

/// Whose clock the scripts use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisClock {
    /// Redis's `TIME`: one clock for every instance (always, outside tests).
    Server,
    /// The `now` passed to each operation, so tests can set the date.
    Caller,
}

/// How a [`RedisStore`] names its keys, times out and leases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisOptions {
    /// The first part of every key (`store.key_prefix`).
    pub prefix: String,
    /// How long an unsettled reservation holds its slot (`store.lease_ms`).
    pub lease: Duration,
    /// The bound on every operation, connecting included (`store.timeout_ms`).
    pub timeout: Duration,
    pub clock: RedisClock,
}

pub struct RedisStore {
    connection: RedisConnection,
    options: RedisOptions,
    leases: LeaseIds,
    /// Settlements not yet answered: they run detached from their requests
    /// (spawned from a `Drop`), so `flush` waits for them at shutdown rather
    /// than let the process exit under them.
    settling: TaskTracker,
}

/// Lease ids: unique within the process (a bijection of a counter), random
/// across processes (a per-process random start), so two instances'
/// requests never share one.
struct LeaseIds {
    start: u64,
    next: AtomicU64,
}

impl LeaseIds {
    fn new() -> Self {
        let start = getrandom::u64().unwrap_or_else(|_| {
            // No randomness: the time and the process id still differ
            // between instances.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            nanos ^ u64::from(std::process::id()).rotate_left(40)
        });
        Self {
            start,
            next: AtomicU64::new(0),
        }
    }

    fn next(&self) -> u64 {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        splitmix64(self.start.wrapping_add(n))
    }
}

/// SplitMix64's finaliser: a bijection on u64 that scatters a counter.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One account's keys.
struct AccountKeys {
    rpm: String,
    tpm: String,
    day: String,
    month: String,
    leases: String,
    expired: String,
    cday: String,
    cmonth: String,
}

impl AccountKeys {
    /// `{prefix}:v1:{account}:window`, the account's key in the hash tag;
    /// a team member's `{prefix}:v1:{team}client:window`.
    fn new(prefix: &str, account: &Account) -> Self {
        let base = match account.home() {
            None => format!("{prefix}:{LAYOUT}:{{{}}}:", encode(account.key())),
            Some(home) => format!(
                "{prefix}:{LAYOUT}:{{{}}}{}:",
                encode(home),
                encode(account.key())
            ),
        };
        Self {
            rpm: format!("{base}rpm"),
            tpm: format!("{base}tpm"),
            day: format!("{base}day"),
            month: format!("{base}month"),
            leases: format!("{base}leases"),
            expired: format!("{base}expired"),
            cday: format!("{base}cday"),
            cmonth: format!("{base}cmonth"),
        }
    }

    /// Names every key in `call`'s `KEYS`, in the one order every script
    /// of the layout reads them.
    fn pass_to(self, call: &mut LuaCall) {
        for key in [
            self.rpm,
            self.tpm,
            self.day,
            self.month,
            self.leases,
            self.expired,
            self.cday,
            self.cmonth,
        ] {
            call.key(key);
        }
    }
}

/// A deployment's health keys: `{prefix}:v1:{health/<deployment>}:fails`
/// and `:cooldown`, the deployment in the hash tag (one slot for both).
fn health_keys(prefix: &str, deployment: &str) -> (String, String) {
    let base = format!("{prefix}:{LAYOUT}:{{health/{}}}:", encode(deployment));
    (format!("{base}fails"), format!("{base}cooldown"))
}

/// A budget alert's claim: `{prefix}:v1:{alert/<claim key>}` (a slot of
/// its own: one key, one command).
fn alert_key(prefix: &str, claim: &str) -> String {
    format!("{prefix}:{LAYOUT}:{{alert/{}}}", encode(claim))
}

/// `name` safe inside a hash tag and a `:`-separated key.
fn encode(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'~' | b'-') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

impl RedisStore {
    /// A store on `url`. Does not wait for Redis: Iris starts (and reports
    /// not ready) while Redis is down, and connects when it answers.
    pub fn connect(url: &str, options: RedisOptions) -> Result<Arc<Self>, StoreError> {
        // The URL may carry a password: never repeat it in an error.
        let connection = RedisConnection::open(url, options.timeout)
            .map_err(|e| StoreError(format!("store.url: {e}")))?;
        Ok(Arc::new(Self {
            connection,
            options,
            leases: LeaseIds::new(),
            settling: TaskTracker::new(),
        }))
    }

    /// Its connection, for others to share (the response cache).
    pub fn connection(&self) -> &RedisConnection {
        &self.connection
    }

    fn keys(&self, account: &Account) -> AccountKeys {
        AccountKeys::new(&self.options.prefix, account)
    }

    /// The script's `now` argument: empty for Redis's clock, else µs.
    fn now_arg(&self, now: u64) -> String {
        match self.options.clock {
            RedisClock::Server => String::new(),
            RedisClock::Caller => (now / 1000).to_string(),
        }
    }

    /// The settle script for `hold`; a `cancel` changes nothing unless the
    /// reservation is still live (see [`Store::reserve`] below).
    fn settlement(
        &self,
        parties: &[Party],
        hold: &Hold,
        actual: Charge,
        now: u64,
        cancel: bool,
    ) -> LuaCall {
        let mut invocation = SETTLE.call();
        for party in parties {
            self.keys(&party.account).pass_to(&mut invocation);
        }
        invocation
            .arg(self.now_arg(now))
            .arg(hold.lease)
            .arg(hold.tokens)
            .arg(actual.tokens)
            .arg(hold.cost.micros())
            .arg(actual.cost.micros())
            .arg(hold.day)
            .arg(hold.month)
            .arg(if cancel { "1" } else { "" });
        for party in parties {
            invocation.arg(limit_arg(party.limits.tokens_per_minute));
        }
        invocation
    }

    /// Runs a script call within the timeout.
    fn run<T: FromRedisValue + Send + 'static>(
        &self,
        call: LuaCall,
    ) -> impl Future<Output = Result<T, StoreError>> + Send + 'static {
        let connection = self.connection.clone();
        let timeout = self.options.timeout;
        async move { bounded(timeout, async move { connection.eval::<T>(&call).await }).await }
    }

    /// Runs an idempotent script call (a settle, a cancel) until Redis
    /// answers it, each attempt within the timeout, for as long as the
    /// lease lasts: an answer lost in a failover is asked for again.
    fn run_until_answered<T: FromRedisValue + Send + 'static>(
        &self,
        call: LuaCall,
    ) -> impl Future<Output = Result<T, StoreError>> + Send + 'static {
        let connection = self.connection.clone();
        let timeout = self.options.timeout;
        let give_up = tokio::time::Instant::now() + self.options.lease;
        async move {
            let mut pause = Duration::from_millis(50);
            loop {
                let failure = match tokio::time::timeout(timeout, connection.eval::<T>(&call)).await
                {
                    Ok(Ok(value)) => return Ok(value),
                    Ok(Err(e)) if !connection::transient(&e) => {
                        return Err(StoreError(format!("redis: {e}")));
                    }
                    Ok(Err(e)) => format!("redis: {e}"),
                    Err(_) => format!("redis did not answer within {} ms", timeout.as_millis()),
                };
                if tokio::time::Instant::now() + pause >= give_up {
                    return Err(StoreError(failure));
                }
                tracing::debug!("a settlement is sent again: {failure}");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// `future` within `timeout`, its errors as store errors.
async fn bounded<T>(
    timeout: Duration,
    future: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(timeout, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(StoreError(format!("redis: {e}"))),
        Err(_) => Err(StoreError(format!(
            "redis did not answer within {} ms",
            timeout.as_millis()
        ))),
    }
}

fn limit_arg(limit: Option<u64>) -> String {
    limit.map(|l| l.to_string()).unwrap_or_default()
}

fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn to_u32(value: i64) -> u32 {
    u32::try_from(value).unwrap_or(0)
}

/// Values per account in a script's reply.
const STATE_LEN: usize = 9;

/// The state a script returned for one account (two TATs, day, day used,
/// month, month used, in flight, money used in the day and the month), as
/// the [`ClientState`] whose snapshot the other stores compute the same way.
fn state_from(reply: &[i64]) -> Result<ClientState, StoreError> {
    let [
        rpm,
        tpm,
        day,
        day_used,
        month,
        month_used,
        in_flight,
        cday_used,
        cmonth_used,
    ] = reply
    else {
        return Err(StoreError(format!(
            "redis: unexpected script reply {reply:?}"
        )));
    };
    let micros = |us: i64| to_u64(us).saturating_mul(1000);
    let calendar = |period: i64, used: i64| Calendar {
        period: to_u32(period),
        used: to_u64(used),
    };
    Ok(ClientState {
        requests: Bucket { tat: micros(*rpm) },
        tokens: Bucket { tat: micros(*tpm) },
        day: calendar(*day, *day_used),
        month: calendar(*month, *month_used),
        cost_day: calendar(*day, *cday_used),
        cost_month: calendar(*month, *cmonth_used),
        in_flight: to_u64(*in_flight),
    })
}

/// The refusal to report from the windows the script refused (party, window
/// index, wait in µs): the one the client must wait longest for, as
/// `window.rs` picks.
fn refusal_from(
    refused: &[i64],
    parties: &[Party],
    charge: Charge,
    now: u64,
) -> Result<Refused, StoreError> {
    let periods = Periods::at(now);
    let mut refusals = Vec::new();
    for triple in refused.chunks_exact(3) {
        let party = usize::try_from(triple[0])
            .ok()
            .filter(|&p| p < parties.len())
            .ok_or_else(|| StoreError(format!("redis: unknown party {}", triple[0])))?;
        let window = usize::try_from(triple[1])
            .ok()
            .and_then(|i| Window::ALL.get(i).copied())
            .ok_or_else(|| StoreError(format!("redis: unknown window {}", triple[1])))?;
        let wait = to_u64(triple[2]).saturating_mul(1000);
        let limit = window.limit(&parties[party].limits).unwrap_or(0);
        let amount = window.amount(charge);
        let refusal = match window {
            Window::MaxConcurrent => Refusal::RateLimited {
                window,
                wait: CONCURRENCY_RETRY,
            },
            Window::RequestsPerMinute => Refusal::RateLimited { window, wait },
            _ if amount > limit => Refusal::TooLarge {
                window,
                limit,
                amount,
            },
            Window::TokensPerMinute => Refusal::RateLimited { window, wait },
            Window::TokensPerDay
            | Window::TokensPerMonth
            | Window::CostPerDay
            | Window::CostPerMonth => Refusal::Exhausted {
                window,
                reset_at: periods.end_of(window),
            },
        };
        refusals.push(Refused { party, refusal });
    }
    worst(refusals).ok_or_else(|| StoreError("redis: a refusal without a window".into()))
}

impl Store for RedisStore {
    fn reserve(&self, parties: &Parties, charge: Charge, now: u64) -> StoreFuture<Reserved> {
        let lease = self.leases.next();
        let mut invocation = RESERVE.call();
        for party in parties.iter() {
            self.keys(&party.account).pass_to(&mut invocation);
        }
        invocation
            .arg(self.now_arg(now))
            .arg(charge.tokens)
            .arg(charge.cost.micros())
            .arg(lease)
            .arg(u64::try_from(self.options.lease.as_micros()).unwrap_or(u64::MAX));
        for party in parties.iter() {
            let limits = &party.limits;
            invocation
                .arg(limit_arg(limits.requests_per_minute))
                .arg(limit_arg(limits.tokens_per_minute))
                .arg(limit_arg(limits.tokens_per_day))
                .arg(limit_arg(limits.tokens_per_month))
                .arg(limit_arg(limits.max_concurrent))
                .arg(limit_arg(limits.cost_per_day.map(Money::micros)))
                .arg(limit_arg(limits.cost_per_month.map(Money::micros)));
        }
        let reply = self.run::<Vec<i64>>(invocation);
        // If the reply is lost (a timeout, a dropped connection), the script
        // may still have run: then a cancel, queued behind it, gives the
        // reservation back at once instead of when its lease ends. Its day
        // and month are this instance's guess; wrong only at midnight, when
        // the amounts stay charged (the safe side).
        let guess = Periods::at(match self.options.clock {
            RedisClock::Caller => now,
            RedisClock::Server => crate::budget::window::Clock::system().now(),
        });
        let lost = Hold {
            tokens: charge.tokens,
            cost: charge.cost,
            day: guess.day,
            month: guess.month,
            lease,
        };
        let cancel = self.run_until_answered::<i64>(self.settlement(
            parties,
            &lost,
            Charge::default(),
            now,
            true,
        ));
        let parties = Arc::clone(parties);
        Box::pin(async move {
            let reply = match reply.await {
                Ok(reply) => reply,
                Err(e) => {
                    tokio::spawn(async move {
                        if let Ok(1) = cancel.await {
                            tracing::info!("a reservation whose answer was lost was given back");
                        }
                    });
                    return Err(e);
                }
            };
            let [admitted, now, rest @ ..] = &reply[..] else {
                return Err(StoreError("redis: short script reply".into()));
            };
            let now = to_u64(*now).saturating_mul(1000);
            let (states, refused) = rest.split_at(rest.len().min(STATE_LEN * parties.len()));
            let states = states
                .chunks(STATE_LEN)
                .map(state_from)
                .collect::<Result<Vec<_>, _>>()?;
            let Some(first) = states.first() else {
                return Err(StoreError("redis: a reply without a state".into()));
            };
            let outcome = if *admitted == 1 {
                Ok(Hold {
                    tokens: charge.tokens,
                    cost: charge.cost,
                    day: first.day.period,
                    month: first.month.period,
                    lease,
                })
            } else {
                Err(refusal_from(refused, &parties, charge, now)?)
            };
            Ok(Reserved {
                outcome,
                snapshots: parties
                    .iter()
                    .zip(&states)
                    .map(|(party, state)| state.snapshot(&party.limits, now))
                    .collect(),
            })
        })
    }

    fn settle(&self, parties: &Parties, hold: Hold, actual: Charge, now: u64) -> StoreFuture<()> {
        let reply =
            self.run_until_answered::<i64>(self.settlement(parties, &hold, actual, now, false));
        Box::pin(self.settling.track_future(async move {
            match reply.await? {
                0 => tracing::warn!(
                    "a reservation settled after its lease expired: its concurrency slot \
                     had been freed already (raise store.lease_ms above the longest request)"
                ),
                2 => tracing::info!(
                    "a settlement found nothing to settle: settled already by an attempt \
                     whose answer was lost, or its reservation was lost with a failed \
                     primary's unreplicated writes"
                ),
                _ => {}
            }
            Ok(())
        }))
    }

    fn snapshot(&self, account: &Account, limits: &Limits, now: u64) -> StoreFuture<Snapshot> {
        let mut invocation = SNAPSHOT.call();
        self.keys(account).pass_to(&mut invocation);
        invocation.arg(self.now_arg(now));
        let reply = self.run::<Vec<i64>>(invocation);
        let limits = *limits;
        Box::pin(async move {
            let reply = reply.await?;
            let [now, state @ ..] = &reply[..] else {
                return Err(StoreError("redis: empty script reply".into()));
            };
            let now = to_u64(*now).saturating_mul(1000);
            Ok(state_from(state)?.snapshot(&limits, now))
        })
    }

    fn health(&self) -> StoreFuture<()> {
        let mut connection = self.connection.clone();
        let timeout = self.options.timeout;
        Box::pin(async move {
            let pong: String =
                bounded(timeout, redis::cmd("PING").query_async(&mut connection)).await?;
            if pong == "PONG" {
                Ok(())
            } else {
                Err(StoreError(format!("redis answered PING with {pong:?}")))
            }
        })
    }

    /// Every operation is written when it happens; this only waits for the
    /// settlements still on their way (bounded: each is bounded itself).
    fn flush(&self) -> StoreFuture<()> {
        let settling = self.settling.clone();
        let limit = self.options.timeout.saturating_mul(2);
        Box::pin(async move {
            settling.close();
            let waited = tokio::time::timeout(limit, settling.wait()).await;
            // Still usable after a flush (tests and `iris usage` flush early).
            settling.reopen();
            waited.map_err(|_| {
                StoreError(format!(
                    "{} settlement(s) still unanswered by Redis",
                    settling.len()
                ))
            })
        })
    }
}

/// Shares deployment health on the budget store's connection, under keys
/// of their own (see the module documentation).
impl SharedHealth for RedisStore {
    fn share_failure(
        &self,
        key: &str,
        window: Duration,
        allowed: u32,
        cooldown: Duration,
    ) -> ShareFuture<()> {
        let (fails, cooling) = health_keys(&self.options.prefix, key);
        let mut invocation = SHARE_FAILURE.call();
        invocation
            .key(fails)
            .key(cooling)
            .arg(millis(window))
            .arg(allowed)
            .arg(millis(cooldown));
        let reply = self.run::<i64>(invocation);
        Box::pin(async move { reply.await.map(drop).map_err(|e| ShareError(e.0)) })
    }

    fn share_cooldown(&self, key: &str, length: Duration) -> ShareFuture<()> {
        let (_, cooling) = health_keys(&self.options.prefix, key);
        let mut invocation = SHARE_COOLDOWN.call();
        invocation.key(cooling).arg(millis(length).max(1));
        let reply = self.run::<i64>(invocation);
        Box::pin(async move { reply.await.map(drop).map_err(|e| ShareError(e.0)) })
    }

    fn shared_cooldowns(&self, keys: &[Arc<str>]) -> ShareFuture<Vec<Option<Duration>>> {
        let names: Vec<String> = keys
            .iter()
            .map(|key| health_keys(&self.options.prefix, key).1)
            .collect();
        let connection = self.connection.clone();
        let timeout = self.options.timeout;
        Box::pin(async move {
            let ttls: Vec<i64> = bounded(timeout, async move {
                if connection.is_cluster() {
                    // Each deployment's keys have a slot of their own, and a
                    // pipeline must stay within one: one PTTL each, sent
                    // together (the cluster client writes them at once).
                    let asks = names.iter().map(|name| {
                        let mut connection = connection.clone();
                        let mut pttl = redis::cmd("PTTL");
                        pttl.arg(name);
                        async move { pttl.query_async::<i64>(&mut connection).await }
                    });
                    futures_util::future::try_join_all(asks).await
                } else {
                    let mut pipeline = redis::pipe();
                    for name in &names {
                        pipeline.cmd("PTTL").arg(name);
                    }
                    let mut connection = connection;
                    pipeline.query_async(&mut connection).await
                }
            })
            .await
            .map_err(|e| ShareError(e.0))?;
            Ok(ttls
                .into_iter()
                .map(|ttl| u64::try_from(ttl).ok().map(Duration::from_millis))
                .collect())
        })
    }
}

/// Claims budget alerts on the budget store's connection: `SET NX PX`, so
/// of every instance that raises the same alert, one gets `OK`.
impl AlertClaims for RedisStore {
    fn claim(&self, key: &str, ttl: Duration) -> ClaimFuture {
        let mut set = redis::cmd("SET");
        set.arg(alert_key(&self.options.prefix, key))
            .arg("1")
            .arg("NX")
            .arg("PX")
            .arg(millis(ttl).max(1));
        let mut connection = self.connection.clone();
        let timeout = self.options.timeout;
        Box::pin(async move {
            let reply: Option<String> = bounded(timeout, set.query_async(&mut connection))
                .await
                .map_err(|e| ClaimError(e.0))?;
            Ok(reply.is_some())
        })
    }
}

#[cfg(test)]
pub(crate) mod tests;
