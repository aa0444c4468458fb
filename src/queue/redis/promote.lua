-- Promote: move due ids from the delayed and scheduled sets to the active list, in bounded chunks.
-- KEYS[1] delayed zset (ms scores), KEYS[2] apalis scheduled zset (s scores),
-- KEYS[3] active list, KEYS[4] signal list
-- ARGV[1] chunk size, ARGV[2] budget (max ids moved by this call)
-- Returns {moved, ms until the next delayed id falls due, or -1 when none waits}
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now_s = tonumber(t[1])
local now_ms = now_s * 1000 + tonumber(t[2]) / 1000
local chunk = tonumber(ARGV[1])
local budget = tonumber(ARGV[2])
local moved = 0
local function drain(key, max_score)
  while moved < budget do
    local n = math.min(chunk, budget - moved)
    local ids = redis.call('ZRANGEBYSCORE', key, '-inf', max_score, 'LIMIT', 0, n)
    if #ids == 0 then return end
    redis.call('RPUSH', KEYS[3], unpack(ids))
    redis.call('ZREM', key, unpack(ids))
    moved = moved + #ids
    if #ids < n then return end
  end
end
drain(KEYS[1], now_ms)
drain(KEYS[2], now_s)
if moved > 0 then
  redis.call('DEL', KEYS[4])
  redis.call('LPUSH', KEYS[4], 1)
end
local next_ms = -1
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #first > 0 then next_ms = math.max(0, math.ceil(tonumber(first[2]) - now_ms)) end
first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if #first > 0 then
  local s = math.max(0, math.ceil(tonumber(first[2]) * 1000 - now_ms))
  if next_ms < 0 or s < next_ms then next_ms = s end
end
return {moved, next_ms}
