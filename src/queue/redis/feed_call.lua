-- Feed: top the active list up from the fair set.
-- KEYS[1] active list, KEYS[2] fair zset, KEYS[3] signal list; ARGV[1] active list cap
-- Returns how many ids moved, and how many still wait in the fair set.
local moved = feed(KEYS[1], KEYS[2], KEYS[3], tonumber(ARGV[1]))
return {moved, redis.call('ZCARD', KEYS[2])}
