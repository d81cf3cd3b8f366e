-- Reserve `tokens` and `cost`, one request and one concurrency slot against
-- every window of every party (a client, or a client and its team) at once,
-- or nothing anywhere (the refusing windows are returned instead).
--
-- KEYS: per party, the 8 keys every script of this layout takes: rpm, tpm,
--       day, month, leases, expired, cday, cmonth (all in one hash slot: a
--       team member's keys are kept in its team's)
-- ARGV: now_us or '', tokens, cost (micro-units), lease id, lease duration
--       (us), then per party 7 limits ('' = no limit): requests_per_minute,
--       tokens_per_minute, tokens_per_day, tokens_per_month, max_concurrent,
--       cost_per_day, cost_per_month
-- Returns: admitted (1/0), now, then per party: rpm TAT, tpm TAT, day, day
--          used, month, month used, in flight, cost day used, cost month
--          used (0 for a money window without a limit when the request costs
--          nothing: not read); then (party index from 0, window index, wait
--          us) per refusal.
local now = now_us(ARGV[1])
local tokens, cost = tonumber(ARGV[2]), tonumber(ARGV[3])
local lease_id, lease_us = ARGV[4], tonumber(ARGV[5])
local parties = #KEYS / 8

local day, day_end, month, month_end = periods(now)
local horizon = now + MINUTE

-- Window indexes as in window.rs Window::ALL.
local refused = {}
local states = {}
for p = 1, parties do
  local k, a = (p - 1) * 8, 5 + (p - 1) * 7
  local rpm_limit, tpm_limit = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local day_limit, month_limit = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local max_concurrent = tonumber(ARGV[a + 5])
  local cday_limit, cmonth_limit = tonumber(ARGV[a + 6]), tonumber(ARGV[a + 7])
  local s = {
    rpm_tat = get_tat(KEYS[k + 1]),
    tpm_tat = get_tat(KEYS[k + 2]),
    day_used = calendar_used(KEYS[k + 3], day),
    month_used = calendar_used(KEYS[k + 4], month),
  }
  -- Money is read only where it decides something (a limit) or changes (a
  -- cost): most requests have neither, and skip two reads.
  s.cday_used = (cday_limit or cost > 0) and calendar_used(KEYS[k + 7], day) or 0
  s.cmonth_used = (cmonth_limit or cost > 0) and calendar_used(KEYS[k + 8], month) or 0
  -- Leases past their expiry belong to requests that never settled (their
  -- instance died): their slots are free again, their tokens stay charged,
  -- and they are remembered (a day) so that a late settlement corrects the
  -- tokens once, and a repeated one does nothing.
  local expired = redis.call('ZRANGEBYSCORE', KEYS[k + 5], '-inf', int(now))
  if #expired > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[k + 5], '-inf', int(now))
    for _, id in ipairs(expired) do
      redis.call('ZADD', KEYS[k + 6], int(now), id)
    end
    redis.call('ZREMRANGEBYSCORE', KEYS[k + 6], '-inf', int(now - EXPIRED_KEPT))
    redis.call('PEXPIRE', KEYS[k + 6], int(EXPIRED_KEPT / 1000))
  end
  s.in_flight = redis.call('ZCARD', KEYS[k + 5])

  local function refuse(window, wait)
    refused[#refused + 1] = p - 1
    refused[#refused + 1] = window
    refused[#refused + 1] = wait
  end
  if max_concurrent and s.in_flight >= max_concurrent then
    refuse(4, 0)
  end
  if rpm_limit then
    s.new_rpm = math.max(s.rpm_tat, now) + drain(1, rpm_limit)
    if s.new_rpm > horizon then
      refuse(0, s.new_rpm - horizon)
    end
  end
  if tpm_limit then
    if tokens > tpm_limit then
      refuse(1, 0)
    else
      s.new_tpm = math.max(s.tpm_tat, now) + drain(tokens, tpm_limit)
      if s.new_tpm > horizon then
        refuse(1, s.new_tpm - horizon)
      end
    end
  end
  if day_limit and s.day_used + tokens > day_limit then
    refuse(2, 0)
  end
  if month_limit and s.month_used + tokens > month_limit then
    refuse(3, 0)
  end
  if cday_limit and s.cday_used + cost > cday_limit then
    refuse(5, 0)
  end
  if cmonth_limit and s.cmonth_used + cost > cmonth_limit then
    refuse(6, 0)
  end
  states[p] = s
end

-- A calendar key {p = period, u = used}, kept an hour past its period.
local function set_calendar(key, period, used, period_end)
  redis.call('HSET', key, 'p', int(period), 'u', int(used))
  redis.call('PEXPIRE', key, int(math.ceil((period_end - now) / 1000) + CALENDAR_MARGIN_MS))
end

if #refused == 0 then
  for p = 1, parties do
    local k, s = (p - 1) * 8, states[p]
    if s.new_rpm then
      set_tat(KEYS[k + 1], s.new_rpm, now)
      s.rpm_tat = s.new_rpm
    end
    if s.new_tpm then
      set_tat(KEYS[k + 2], s.new_tpm, now)
      s.tpm_tat = s.new_tpm
    end
    s.day_used = s.day_used + tokens
    s.month_used = s.month_used + tokens
    set_calendar(KEYS[k + 3], day, s.day_used, day_end)
    set_calendar(KEYS[k + 4], month, s.month_used, month_end)
    -- Money only when there is some: most requests cost nothing (no
    -- price), and a settlement that finds no key of its period starts one.
    if cost > 0 then
      s.cday_used = s.cday_used + cost
      s.cmonth_used = s.cmonth_used + cost
      set_calendar(KEYS[k + 7], day, s.cday_used, day_end)
      set_calendar(KEYS[k + 8], month, s.cmonth_used, month_end)
    end
    redis.call('ZADD', KEYS[k + 5], int(now + lease_us), lease_id)
    s.in_flight = s.in_flight + 1
    -- The set lives as long as its longest lease (instances may be
    -- configured with different lease durations).
    local last = redis.call('ZRANGE', KEYS[k + 5], -1, -1, 'WITHSCORES')
    redis.call('PEXPIRE', KEYS[k + 5], int(math.ceil((tonumber(last[2]) - now) / 1000) + MARGIN_MS))
  end
end

local reply = { #refused == 0 and 1 or 0, now }
for p = 1, parties do
  local s = states[p]
  for _, v in ipairs({ s.rpm_tat, s.tpm_tat, day, s.day_used, month, s.month_used, s.in_flight,
    s.cday_used, s.cmonth_used }) do
    reply[#reply + 1] = v
  end
end
for i = 1, #refused do
  reply[#reply + 1] = refused[i]
end
return reply
