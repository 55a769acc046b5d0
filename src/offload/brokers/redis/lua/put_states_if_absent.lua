-- Store task states where none is stored yet, and signal the change of those stored.
-- KEYS[1]: the namespace prefix.
-- ARGV: ttl in ms (0 = none), then (task id, state, listing) triples (see lib_history.lua).
-- Returns 1.
local ttl = tonumber(ARGV[1])
local t = now()
for i = 2, #ARGV, 3 do
  local id = ARGV[i]
  local stored
  if ttl > 0 then
    stored = redis.call('SET', P .. 'state:' .. id, ARGV[i + 1], 'NX', 'PX', ttl)
  else
    stored = redis.call('SET', P .. 'state:' .. id, ARGV[i + 1], 'NX')
  end
  if stored then
    redis.call('DEL', P .. 'done:' .. id)
    redis.call('PUBLISH', P .. 'task:' .. id, '')
    list_state(id, ARGV[i + 2], ttl, t)
  end
end
prune_history(8 + math.floor(#ARGV / 3), t)
return 1
