-- Retire: hand a stopped worker's claimed ids back to the active list and deregister it.
-- KEYS[1] worker inflight set, KEYS[2] active list, KEYS[3] workers zset,
-- KEYS[4] worker metadata hash, KEYS[5] signal list; ARGV[1] worker name
local ids = redis.call('SMEMBERS', KEYS[1])
local n = #ids
for i = 1, n, 1000 do
  redis.call('RPUSH', KEYS[2], unpack(ids, i, math.min(i + 999, n)))
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('DEL', KEYS[4])
if n > 0 then
  redis.call('DEL', KEYS[5])
  redis.call('LPUSH', KEYS[5], 1)
end
return n
