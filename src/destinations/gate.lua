-- One destination's gate (engine::gate::DestState, the same transitions).
-- KEYS[1] state hash: st (closed|open|half_open), f (consecutive failures),
--         ou (open until), of (last open duration), pu (probe until),
--         ps (the probe's slot), tu (throttled until, Retry-After at most
--         max_open), tat (the rate limit's next free start)
-- KEYS[2] in-flight slots: sorted set, slot -> expiry (epoch ms)
-- KEYS[3..] per-minute counters (calls, failures): release writes the
--         current minute's, status reads the last five
-- ARGV[1] op (admit|release|status|reset), ARGV[2] now (epoch ms)
local op = ARGV[1]
local now = tonumber(ARGV[2])
local function num(field)
  return tonumber(redis.call('HGET', KEYS[1], field) or '0') or 0
end
local state = redis.call('HGET', KEYS[1], 'st') or 'closed'

if op == 'admit' then
  -- ARGV[3] slot, ARGV[4] lease ms, ARGV[5] max_in_flight,
  -- ARGV[6] rate interval ms (0: no limit), ARGV[7] max reservation ahead ms
  local slot, lease = ARGV[3], tonumber(ARGV[4])
  local max_in_flight, interval, max_reserve = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
  if state == 'open' then
    local ou = num('ou')
    if now < ou then return {'wait', ou, 'destination_unavailable', 'circuit open'} end
  elseif state == 'half_open' then
    local pu = num('pu')
    if now < pu then
      return {'wait', pu, 'destination_unavailable', 'circuit half-open: its probe is in flight'}
    end
  end
  local probe = 0
  if state ~= 'closed' then
    -- The probe: one call, whatever the throttling says.
    redis.call('HSET', KEYS[1], 'st', 'half_open', 'pu', now + lease, 'ps', slot)
    probe = 1
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  local start = now
  if probe == 0 then
    local tu = num('tu')
    if tu > now then return {'wait', tu, 'throttled', 'throttled by Retry-After'} end
    local n = redis.call('ZCARD', KEYS[2])
    if n >= max_in_flight then
      return {'wait', now + 25, 'throttled', n .. ' calls in flight (max_in_flight)'}
    end
    if interval > 0 then
      start = math.max(num('tat'), now)
      if start - now > max_reserve then return {'wait', start, 'throttled', 'rate limit'} end
      redis.call('HSET', KEYS[1], 'tat', start + interval)
    end
  end
  redis.call('ZADD', KEYS[2], start + lease, slot)
  redis.call('PEXPIRE', KEYS[2], start + lease - now + 60000)
  return {'go', start, probe}
elseif op == 'release' then
  -- ARGV[3] slot, ARGV[4] probe (1|0), ARGV[5] result (succeeded|refused|failed),
  -- ARGV[6] Retry-After ms (-1: none), ARGV[7] failure_threshold,
  -- ARGV[8] open_for ms, ARGV[9] max_open ms
  redis.call('ZREM', KEYS[2], ARGV[3])
  local failed = ARGV[5] == 'failed'
  redis.call('HINCRBY', KEYS[3], 'calls', 1)
  if failed then redis.call('HINCRBY', KEYS[3], 'failures', 1) end
  redis.call('PEXPIRE', KEYS[3], 360000)
  -- Only the current probe's release decides a half-open circuit.
  local probing = ARGV[4] == '1' and state == 'half_open'
    and redis.call('HGET', KEYS[1], 'ps') == ARGV[3]
  if not failed then
    redis.call('HSET', KEYS[1], 'f', 0)
    if probing then
      redis.call('HSET', KEYS[1], 'st', 'closed')
      return {'closed'}
    end
    return {}
  end
  local open_for, max_open = tonumber(ARGV[8]), tonumber(ARGV[9])
  local ra = tonumber(ARGV[6])
  if ra >= 0 then
    redis.call('HSET', KEYS[1], 'tu', math.max(num('tu'), now + math.min(ra, max_open)))
  end
  if probing then
    local of = math.min(math.max(num('of'), open_for) * 2, max_open)
    redis.call('HSET', KEYS[1], 'st', 'open', 'of', of, 'ou', now + of)
    return {'reopened', now + of}
  end
  -- A call that started before the circuit opened changes nothing.
  if state ~= 'closed' then return {} end
  local f = redis.call('HINCRBY', KEYS[1], 'f', 1)
  if f >= tonumber(ARGV[7]) then
    redis.call('HSET', KEYS[1], 'st', 'open', 'of', open_for, 'ou', now + open_for)
    return {'opened', now + open_for, f}
  end
  return {}
elseif op == 'status' then
  local calls, failures = 0, 0
  for i = 3, #KEYS do
    calls = calls + (tonumber(redis.call('HGET', KEYS[i], 'calls') or '0') or 0)
    failures = failures + (tonumber(redis.call('HGET', KEYS[i], 'failures') or '0') or 0)
  end
  local in_flight = redis.call('ZCOUNT', KEYS[2], '(' .. now, '+inf')
  return {state, num('f'), num('ou'), num('pu'), num('tu'), in_flight, calls, failures}
elseif op == 'reset' then
  -- The rate's schedule (tat) stays: calls reserved before still count.
  redis.call('HDEL', KEYS[1], 'st', 'f', 'ou', 'of', 'pu', 'ps', 'tu')
  return {}
end
return redis.error_reply('unknown gate operation ' .. tostring(op))
