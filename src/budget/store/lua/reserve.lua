-- Reserve `tokens`, one request and one concurrency slot against every
-- window at once, or nothing (the refusing windows are returned instead).
--
-- KEYS: rpm, tpm, day, month, leases, expired (one client's: one hash slot)
-- ARGV: now_us or '', tokens, requests_per_minute, tokens_per_minute,
--       tokens_per_day, tokens_per_month, max_concurrent ('' = no limit),
--       lease id, lease duration (us)
-- Returns: admitted (1/0), now, rpm TAT, tpm TAT, day, day used, month,
--          month used, in flight, then (window index, wait us) per refusal.
local now = now_us(ARGV[1])
local tokens = tonumber(ARGV[2])
local rpm_limit, tpm_limit = tonumber(ARGV[3]), tonumber(ARGV[4])
local day_limit, month_limit = tonumber(ARGV[5]), tonumber(ARGV[6])
local max_concurrent = tonumber(ARGV[7])

local day, day_end, month, month_end = periods(now)
local rpm_tat, tpm_tat = get_tat(KEYS[1]), get_tat(KEYS[2])
local day_used, month_used = calendar_used(KEYS[3], day), calendar_used(KEYS[4], month)
-- Leases past their expiry belong to requests that never settled (their
-- instance died): their slots are free again, their tokens stay charged,
-- and they are remembered (a day) so that a late settlement corrects the
-- tokens once, and a repeated one does nothing.
local expired = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', int(now))
if #expired > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', int(now))
  for _, id in ipairs(expired) do
    redis.call('ZADD', KEYS[6], int(now), id)
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', int(now - EXPIRED_KEPT))
  redis.call('PEXPIRE', KEYS[6], int(EXPIRED_KEPT / 1000))
end
local in_flight = redis.call('ZCARD', KEYS[5])

-- Window indexes as in window.rs Window::ALL.
local refused = {}
local function refuse(window, wait)
  refused[#refused + 1] = window
  refused[#refused + 1] = wait
end
local horizon = now + MINUTE
if max_concurrent and in_flight >= max_concurrent then
  refuse(4, 0)
end
local new_rpm, new_tpm
if rpm_limit then
  new_rpm = math.max(rpm_tat, now) + drain(1, rpm_limit)
  if new_rpm > horizon then
    refuse(0, new_rpm - horizon)
  end
end
if tpm_limit then
  if tokens > tpm_limit then
    refuse(1, 0)
  else
    new_tpm = math.max(tpm_tat, now) + drain(tokens, tpm_limit)
    if new_tpm > horizon then
      refuse(1, new_tpm - horizon)
    end
  end
end
if day_limit and day_used + tokens > day_limit then
  refuse(2, 0)
end
if month_limit and month_used + tokens > month_limit then
  refuse(3, 0)
end

if #refused == 0 then
  if new_rpm then
    set_tat(KEYS[1], new_rpm, now)
    rpm_tat = new_rpm
  end
  if new_tpm then
    set_tat(KEYS[2], new_tpm, now)
    tpm_tat = new_tpm
  end
  day_used = day_used + tokens
  month_used = month_used + tokens
  redis.call('HSET', KEYS[3], 'p', int(day), 'u', int(day_used))
  redis.call('PEXPIRE', KEYS[3], int(math.ceil((day_end - now) / 1000) + CALENDAR_MARGIN_MS))
  redis.call('HSET', KEYS[4], 'p', int(month), 'u', int(month_used))
  redis.call('PEXPIRE', KEYS[4], int(math.ceil((month_end - now) / 1000) + CALENDAR_MARGIN_MS))
  redis.call('ZADD', KEYS[5], int(now + tonumber(ARGV[9])), ARGV[8])
  in_flight = in_flight + 1
  -- The set lives as long as its longest lease (instances may be
  -- configured with different lease durations).
  local last = redis.call('ZRANGE', KEYS[5], -1, -1, 'WITHSCORES')
  redis.call('PEXPIRE', KEYS[5], int(math.ceil((tonumber(last[2]) - now) / 1000) + MARGIN_MS))
end

local reply = { #refused == 0 and 1 or 0, now, rpm_tat, tpm_tat, day, day_used, month,
  month_used, in_flight }
for i = 1, #refused do
  reply[#reply + 1] = refused[i]
end
return reply
