-- Iris budget store, key layout v1: the helpers every script of this
-- layout shares. Rust prepends this file to each script; see redis.rs for
-- the keys and the rule for changing them.
--
-- Times are integer microseconds since the Unix epoch: Lua numbers are
-- doubles, exact to 2^53, which holds microseconds (not nanoseconds).

local MINUTE = 60000000
local DAY_SECS = 86400
-- Calendar keys outlive their period by this much (milliseconds), so a
-- request settling just after midnight still finds the day it was charged to.
local CALENDAR_MARGIN_MS = 3600000
-- Minute buckets and leases outlive their last moment by this much.
local MARGIN_MS = 1000
-- An expired lease is remembered this long (microseconds) for its late
-- settlement to find.
local EXPIRED_KEPT = 86400000000

-- An integer as Redis arguments need it: Lua would print 1.7e15 as
-- "1.7356896e+15".
local function int(x)
  return string.format('%.0f', x)
end

-- "Now": Redis's own clock, one for every instance (TIME is allowed in
-- scripts with effects replication, the only mode since Redis 7), or the
-- caller's when one is passed (tests that cross midnight on purpose).
local function now_us(arg)
  if arg ~= '' then
    return tonumber(arg)
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- Howard Hinnant's civil_from_days / days_from_civil: Redis's Lua has no
-- calendar, so this port is hand-written. window.rs takes its months from
-- jiff; the two are compared at every month boundary from 1999 to 2101 and
-- every midnight of a leap year (redis/tests.rs,
-- lua_calendar_matches_window_rs_at_every_boundary).
local function civil_from_days(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local month = mp < 10 and mp + 3 or mp - 9
  local year = yoe + era * 400 + (month <= 2 and 1 or 0)
  return year, month
end

local function days_from_civil(year, month)
  if month <= 2 then
    year = year - 1
  end
  local era = math.floor(year / 400)
  local yoe = year - era * 400
  local mp = month > 2 and month - 3 or month + 9
  local doy = math.floor((153 * mp + 2) / 5)
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

-- The UTC day (days since 1970-01-01) and month (year * 12 + month - 1)
-- containing `now`, and when each ends, numbered as window.rs numbers them.
-- Whole seconds first: dividing microseconds by a day directly could round
-- 23:59:59.999999 up to the next day.
local function periods(now)
  local secs = math.floor(now / 1000000)
  local day = math.floor(secs / DAY_SECS)
  local year, month = civil_from_days(day)
  local next_year, next_month = year, month + 1
  if next_month == 13 then
    next_year, next_month = year + 1, 1
  end
  local day_end = (day + 1) * DAY_SECS * 1000000
  local month_end = days_from_civil(next_year, next_month) * DAY_SECS * 1000000
  return day, day_end, year * 12 + month - 1, month_end
end

-- Microseconds of refill that `amount` units are for `limit` per minute.
local function drain(amount, limit)
  return math.ceil(amount * MINUTE / limit)
end

-- A minute bucket's TAT (when it is empty again); a missing key is empty.
local function get_tat(key)
  return tonumber(redis.call('GET', key) or '0')
end

-- Stores a TAT, expiring with it: an empty bucket needs no key.
local function set_tat(key, tat, now)
  if tat > now then
    redis.call('SET', key, int(tat), 'PX', int(math.ceil((tat - now) / 1000) + MARGIN_MS))
  else
    redis.call('DEL', key)
  end
end

-- Tokens used in `period` by a calendar key {p = period, u = used}.
local function calendar_used(key, period)
  local stored = redis.call('HMGET', key, 'p', 'u')
  if tonumber(stored[1]) == period then
    return tonumber(stored[2]) or 0
  end
  return 0
end
