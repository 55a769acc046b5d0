-- The most recent dead letters.
-- KEYS[1]: the namespace prefix.
-- ARGV: limit. Returns id, queue, body, reason, time of death per dead letter, newest first.
local out = {}
for _, id in ipairs(redis.call('ZREVRANGE', P .. 'dead', 0, tonumber(ARGV[1]) - 1)) do
  local v = redis.call('HMGET', P .. 'x:' .. id, 'q', 'b', 'r', 't')
  if v[1] then
    out[#out + 1] = id; out[#out + 1] = v[1]; out[#out + 1] = v[2]; out[#out + 1] = v[3]; out[#out + 1] = v[4]
  end
end
return out
