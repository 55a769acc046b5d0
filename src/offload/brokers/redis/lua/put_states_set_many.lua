-- Store task states (see put_states in lib_outcomes.lua), then set key-value entries that are
-- not set yet: both in one round trip.
-- KEYS[1]: the namespace prefix.
-- ARGV: ttl in ms (0 = none), ttl of a done list in ms, number of states n, n (task id, state,
-- final '1'/'0', listing) quadruples, then the ttl in ms of the entries (0 = none) and (key, value) pairs.
-- Returns per entry what set_many_if_absent.lua does.
local n = tonumber(ARGV[3])
put_states(tonumber(ARGV[1]), tonumber(ARGV[2]), 4, 3 + 4 * n)
local ttl = tonumber(ARGV[4 + 4 * n])
local out = {}
for i = 5 + 4 * n, #ARGV, 2 do
  local k = P .. 'kv:' .. ARGV[i]
  local stored
  if ttl > 0 then
    stored = redis.call('SET', k, ARGV[i + 1], 'NX', 'PX', ttl)
  else
    stored = redis.call('SET', k, ARGV[i + 1], 'NX')
  end
  if stored then out[#out + 1] = false else out[#out + 1] = redis.call('GET', k) end
end
return out
