-- Depth: pending tasks = active + fair + delayed + scheduled + claimed by registered workers.
-- KEYS[1] active list, KEYS[2] delayed zset, KEYS[3] scheduled zset, KEYS[4] workers zset,
-- KEYS[5] fair zset; ARGV[1] inflight key prefix
local n = redis.call('LLEN', KEYS[1]) + redis.call('ZCARD', KEYS[2]) + redis.call('ZCARD', KEYS[3])
  + redis.call('ZCARD', KEYS[5])
for _, w in ipairs(redis.call('ZRANGE', KEYS[4], 0, -1)) do
  n = n + redis.call('SCARD', ARGV[1] .. ':' .. w)
end
return n
