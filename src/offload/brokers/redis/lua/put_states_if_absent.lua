-- Store task states where none is stored yet, and signal the change of those stored.
-- KEYS[1]: the namespace prefix.
-- ARGV: ttl in ms (0 = none), then (task id, state) pairs. Returns 1.
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
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
  end
end
return 1
