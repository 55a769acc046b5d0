-- Set keys that are not set yet.
-- KEYS: the keys themselves (not the namespace prefix).
-- ARGV: ttl in ms (0 = none), then one value per key.
-- Returns per key false where the value was stored, else the value held.
local ttl = tonumber(ARGV[1])
local out = {}
for i = 1, #KEYS do
  local stored
  if ttl > 0 then
    stored = redis.call('SET', KEYS[i], ARGV[i + 1], 'NX', 'PX', ttl)
  else
    stored = redis.call('SET', KEYS[i], ARGV[i + 1], 'NX')
  end
  if stored then out[i] = false else out[i] = redis.call('GET', KEYS[i]) end
end
return out
