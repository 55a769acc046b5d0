-- Remove the scheduled messages of a queue. The schedule is shared by all queues, so this walks
-- it once.
-- KEYS[1]: the namespace prefix.
-- ARGV: queue. Returns how many were removed.
local n = 0
for _, id in ipairs(redis.call('ZRANGE', P .. 'sched', 0, -1)) do
  if redis.call('HGET', P .. 'm:' .. id, 'q') == ARGV[1] then
    redis.call('ZREM', P .. 'sched', id)
    drop(id)
    n = n + 1
  end
end
return n
