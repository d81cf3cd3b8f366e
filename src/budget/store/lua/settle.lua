-- Replace what a reservation held (tokens and cost) by what the request
-- used, and free its concurrency slot, for every party of the reservation.
-- Idempotent: a settlement whose answer was lost may be sent again, and
-- changes nothing the second time (each party's lease says whether it was
-- settled already).
--
-- KEYS: per party, the 8 keys every script of this layout takes (rpm, tpm,
--       day, month, leases, expired, cday, cmonth; rpm unused here)
-- ARGV: now_us or '', lease id, tokens held, tokens used, cost held, cost
--       used (micro-units), day and month the hold was charged to, cancel
--       ('1': undo a reservation whose reply was lost, only if it happened),
--       then per party its tokens_per_minute ('' = no limit)
-- Returns, for the first party: 1 if the lease was live; 0 if it had
-- expired (its slot was already freed; the amounts are corrected all the
-- same, once, since an expiring lease gives nothing back); 2 if there was
-- nothing to settle: settled already, a cancel of a reservation that never
-- ran (or expired), or a reservation lost with a failed primary's
-- unreplicated writes.
local now = now_us(ARGV[1])
local lease_id = ARGV[2]
local held, actual = tonumber(ARGV[3]), tonumber(ARGV[4])
local cost_held, cost_actual = tonumber(ARGV[5]), tonumber(ARGV[6])
local periods_held = { tonumber(ARGV[7]), tonumber(ARGV[8]) }
local cancel = ARGV[9] == '1'
local parties = #KEYS / 8

local day_now, day_end, month_now, month_end = periods(now)

-- Correct a calendar key of the period of admission, if it is still the
-- stored one. A key of an older period, or none, while the admission's
-- period is still the current one (a reservation that charged no money
-- wrote no money key) starts that period with what the request used.
local function correct(key, period, take, give, current, period_end)
  local stored = redis.call('HMGET', key, 'p', 'u')
  if stored[1] and tonumber(stored[1]) == period then
    local used = math.max((tonumber(stored[2]) or 0) - take, 0) + give
    redis.call('HSET', key, 'u', int(used))
  elseif give > 0 and period == current then
    redis.call('HSET', key, 'p', int(period), 'u', int(give))
    redis.call('PEXPIRE', key, int(math.ceil((period_end - now) / 1000) + CALENDAR_MARGIN_MS))
  end
end

local first
for p = 1, parties do
  local k = (p - 1) * 8
  local status = redis.call('ZREM', KEYS[k + 5], lease_id)
  if status == 0 and not cancel and redis.call('ZREM', KEYS[k + 6], lease_id) == 1 then
    status = 0
  elseif status == 0 then
    status = 2
  end
  first = first or status
  if status ~= 2 then
    local tpm_limit = tonumber(ARGV[9 + p])
    if tpm_limit then
      local tat = get_tat(KEYS[k + 2])
      if actual > held then
        set_tat(KEYS[k + 2], math.max(tat, now) + drain(actual - held, tpm_limit), now)
      elseif tat > now then
        -- What already drained is not given back twice.
        set_tat(KEYS[k + 2], math.max(tat - drain(held - actual, tpm_limit), now), now)
      end
    end
    correct(KEYS[k + 3], periods_held[1], held, actual, day_now, day_end)
    correct(KEYS[k + 4], periods_held[2], held, actual, month_now, month_end)
    if cost_held > 0 or cost_actual > 0 then
      correct(KEYS[k + 7], periods_held[1], cost_held, cost_actual, day_now, day_end)
      correct(KEYS[k + 8], periods_held[2], cost_held, cost_actual, month_now, month_end)
    end
  end
end
return first
