-- Replace the tokens a reservation held by what the request used, and free
-- its concurrency slot. Idempotent: a settlement whose answer was lost may
-- be sent again, and changes nothing the second time.
--
-- KEYS: tpm, day, month, leases, expired
-- ARGV: now_us or '', lease id, tokens held, tokens used, day and month the
--       hold was charged to, tokens_per_minute ('' = no limit), cancel
--       ('1': undo a reservation whose reply was lost, only if it happened)
-- Returns 1 if the lease was live; 0 if it had expired (its slot was
-- already freed; the tokens are corrected all the same, once, since an
-- expiring lease gives back no tokens); 2 if there was nothing to settle:
-- settled already, a cancel of a reservation that never ran (or expired),
-- or a reservation lost with a failed primary's unreplicated writes.
local now = now_us(ARGV[1])
local live = redis.call('ZREM', KEYS[4], ARGV[2])
if live == 0 then
  if ARGV[8] == '1' or redis.call('ZREM', KEYS[5], ARGV[2]) == 0 then
    return 2
  end
end
local held, actual = tonumber(ARGV[3]), tonumber(ARGV[4])
local tpm_limit = tonumber(ARGV[7])

if tpm_limit then
  local tat = get_tat(KEYS[1])
  if actual > held then
    set_tat(KEYS[1], math.max(tat, now) + drain(actual - held, tpm_limit), now)
  elseif tat > now then
    -- What already drained is not given back twice.
    set_tat(KEYS[1], math.max(tat - drain(held - actual, tpm_limit), now), now)
  end
end

-- Correct the day and month of admission, if they are still the stored ones.
for i, key in ipairs({ KEYS[2], KEYS[3] }) do
  local stored = redis.call('HMGET', key, 'p', 'u')
  if stored[1] and tonumber(stored[1]) == tonumber(ARGV[4 + i]) then
    local used = math.max((tonumber(stored[2]) or 0) - held, 0) + actual
    redis.call('HSET', key, 'u', int(used))
  end
end
return live
