-- Sanitize: drop ids at the head of the active list whose data or metadata is gone.
-- KEYS[1] active list, KEYS[2] data hash, KEYS[3] metadata key prefix; ARGV[1] how many
local ids = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
local removed = 0
for _, id in ipairs(ids) do
  if redis.call('HEXISTS', KEYS[2], id) == 0 or redis.call('EXISTS', KEYS[3] .. ':' .. id) == 0 then
    removed = removed + redis.call('LREM', KEYS[1], 0, id)
  end
end
return removed
