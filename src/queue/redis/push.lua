-- Push: tasks due now go straight to the active list, delayed ones to our delayed set.
-- KEYS[1] data hash, KEYS[2] active list, KEYS[3] signal list, KEYS[4] delayed zset (ms),
-- KEYS[5] metadata key prefix
-- ARGV: repeated (task_id, payload, delay_us)
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local enqueued = 0
for i = 1, #ARGV, 3 do
  local id = ARGV[i]
  if redis.call('HSETNX', KEYS[1], id, ARGV[i + 1]) == 1 then
    redis.call('HSET', KEYS[5] .. ':' .. id, 'attempts', '0', 'max_attempts', '1',
      'status', 'Pending', 'idempotency_key', '')
    local delay_us = tonumber(ARGV[i + 2])
    if delay_us > 0 then
      redis.call('ZADD', KEYS[4], now_ms + delay_us / 1000, id)
    else
      redis.call('RPUSH', KEYS[2], id)
      enqueued = enqueued + 1
    end
  end
end
if enqueued > 0 then
  redis.call('DEL', KEYS[3])
  redis.call('LPUSH', KEYS[3], 1)
end
return enqueued
