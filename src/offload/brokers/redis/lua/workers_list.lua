-- The records of the live workers, after removing those whose time ran out (a killed worker
-- never removes its own).
-- KEYS[1]: the namespace prefix. No ARGV. Returns the live records, in no order.
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local index, records = KEYS[1] .. 'workers', KEYS[1] .. 'workers:rec'
local gone = redis.call('ZRANGEBYSCORE', index, '-inf', now_ms)
if #gone > 0 then
  redis.call('HDEL', records, unpack(gone))
  redis.call('ZREMRANGEBYSCORE', index, '-inf', now_ms)
end
local live = redis.call('ZRANGE', index, 0, -1)
if #live == 0 then return {} end
local found = {}
for _, r in ipairs(redis.call('HMGET', records, unpack(live))) do
  if r then found[#found + 1] = r end
end
return found
