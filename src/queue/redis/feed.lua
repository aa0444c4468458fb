-- feed(): tops the active list up to ARGV[1] ids from the fair set, lowest tag first.
-- Shared by the push and feed scripts (prepended to each); their KEYS name
-- the active list, the fair set and the signal list.
local function feed(active, fair, signal, cap)
  local room = cap - redis.call('LLEN', active)
  if room <= 0 then return 0 end
  local popped = redis.call('ZPOPMIN', fair, room)
  local n = #popped / 2
  if n == 0 then return 0 end
  local ids = {}
  for i = 1, #popped, 2 do ids[#ids + 1] = popped[i] end
  redis.call('RPUSH', active, unpack(ids))
  redis.call('DEL', signal)
  redis.call('LPUSH', signal, 1)
  return n
end
