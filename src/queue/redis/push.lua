-- Push: tasks due now get a fair-sharing tag in the fair set (then the active
-- list is topped up), delayed ones go to our delayed set.
-- KEYS[1] data hash, KEYS[2] active list, KEYS[3] signal list, KEYS[4] delayed zset (ms),
-- KEYS[5] metadata key prefix, KEYS[6] fair zset (tags), KEYS[7] flows hash
-- ARGV[1] active list cap; then repeated (task_id, payload, delay_us, partner, cost)
-- The flows hash holds each partner's finish tag and, under ':high', the
-- largest tag given; V is the lowest tag waiting, or ':high' when none is.
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local high = tonumber(redis.call('HGET', KEYS[7], ':high') or '0')
local first = redis.call('ZRANGE', KEYS[6], 0, 0, 'WITHSCORES')
local v = high
if #first > 0 then v = tonumber(first[2]) end
local tagged = 0
for i = 2, #ARGV, 5 do
  local id = ARGV[i]
  if redis.call('HSETNX', KEYS[1], id, ARGV[i + 1]) == 1 then
    redis.call('HSET', KEYS[5] .. ':' .. id, 'attempts', '0', 'max_attempts', '1',
      'status', 'Pending', 'idempotency_key', '')
    local delay_us = tonumber(ARGV[i + 2])
    if delay_us > 0 then
      redis.call('ZADD', KEYS[4], now_ms + delay_us / 1000, id)
    else
      local partner = 'p:' .. ARGV[i + 3]
      local start = math.max(v, tonumber(redis.call('HGET', KEYS[7], partner) or '0'))
      redis.call('HSET', KEYS[7], partner, string.format('%.0f', start + tonumber(ARGV[i + 4])))
      redis.call('ZADD', KEYS[6], start, id)
      if start > high then high = start end
      tagged = tagged + 1
    end
  end
end
if tagged > 0 then
  redis.call('HSET', KEYS[7], ':high', string.format('%.0f', high))
  -- Partners idle for a day are forgotten (they would start at V anyway).
  redis.call('EXPIRE', KEYS[7], 86400)
end
feed(KEYS[2], KEYS[6], KEYS[3], tonumber(ARGV[1]))
return tagged
