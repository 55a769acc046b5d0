-- Does a scheduled message of one of the queues come due within some seconds (or is it due)?
-- The schedule is shared by all queues: only its part due that soon is read.
-- KEYS[1]: the namespace prefix.
-- ARGV: seconds ahead, queue... Returns 1 or 0.
local wanted = {}
for i = 2, #ARGV do wanted[ARGV[i]] = true end
local ids = redis.call('ZRANGEBYSCORE', P .. 'sched', '-inf', fmt(now() + tonumber(ARGV[1])), 'LIMIT', 0, 1000)
for _, id in ipairs(ids) do
  local q = redis.call('HGET', P .. 'm:' .. id, 'q')
  if q and wanted[q] then return 1 end
end
return 0
