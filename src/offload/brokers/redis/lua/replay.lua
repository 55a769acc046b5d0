-- Remove dead letters and return them, for the caller to enqueue again.
-- KEYS[1]: the namespace prefix.
-- ARGV: all ('1'/'0'), then the ids when not all. Returns what dead_list.lua does, oldest first.
local ids
if ARGV[1] == '1' then
  ids = redis.call('ZRANGE', P .. 'dead', 0, -1)
else
  ids = {}
  for i = 2, #ARGV do ids[#ids + 1] = ARGV[i] end
end
local out = {}
for _, id in ipairs(ids) do
  local xk = P .. 'x:' .. id
  local v = redis.call('HMGET', xk, 'q', 'b', 'r', 't')
  if v[1] then
    out[#out + 1] = id; out[#out + 1] = v[1]; out[#out + 1] = v[2]; out[#out + 1] = v[3]; out[#out + 1] = v[4]
    redis.call('DEL', xk)
    redis.call('ZREM', P .. 'dead', id)
  end
end
return out
