-- An account's windows now, read only.
--
-- KEYS: rpm, tpm, day, month, leases, expired, cday, cmonth (expired unused)
-- ARGV: now_us or ''
-- Returns: now, rpm TAT, tpm TAT, day, day used, month, month used, in
--          flight, cost day used, cost month used.
local now = now_us(ARGV[1])
local day, _, month = periods(now)
return { now, get_tat(KEYS[1]), get_tat(KEYS[2]), day, calendar_used(KEYS[3], day), month,
  calendar_used(KEYS[4], month), redis.call('ZCOUNT', KEYS[5], '(' .. int(now), '+inf'),
  calendar_used(KEYS[7], day), calendar_used(KEYS[8], month) }
