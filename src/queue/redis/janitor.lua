-- Janitor: delete the data and metadata of finished tasks.
-- KEYS[1] done set, KEYS[2] dead set, KEYS[3] data hash, KEYS[4] metadata key prefix
-- ARGV[1] max ids per set
local removed = 0
for _, set in ipairs({KEYS[1], KEYS[2]}) do
  local ids = redis.call('SPOP', set, tonumber(ARGV[1]))
  for _, id in ipairs(ids) do
    redis.call('HDEL', KEYS[3], id)
    redis.call('DEL', KEYS[4] .. ':' .. id)
    removed = removed + 1
  end
end
return removed
