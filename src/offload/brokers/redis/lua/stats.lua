-- Counts for this namespace, after moving due messages and expired leases to their queues.
-- KEYS[1]: the namespace prefix. No ARGV.
-- Returns scheduled, running, dead, then (queue, ready count) for every non-empty queue.
surface(now())
local out = {redis.call('ZCARD', P .. 'sched'), redis.call('ZCARD', P .. 'lease'), redis.call('ZCARD', P .. 'dead')}
for _, q in ipairs(redis.call('SMEMBERS', P .. 'queues')) do
  local n = redis.call('ZCARD', P .. 'q:' .. q)
  if n > 0 then out[#out + 1] = q; out[#out + 1] = n end
end
return out
