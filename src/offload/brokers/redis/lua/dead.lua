-- Move a message to the dead letters with its reason, wherever it was, and forget it.
-- KEYS[1]: the namespace prefix.
-- ARGV: id, queue, body, reason. Returns 1.
local id = ARGV[1]
local q = redis.call('HGET', P .. 'm:' .. id, 'q')
if redis.call('ZREM', P .. 'lease', id) == 0 and q then
  redis.call('ZREM', P .. 'q:' .. q, id)
  redis.call('ZREM', P .. 'sched', id)
end
drop(id)
local t = fmt(now())
redis.call('HSET', P .. 'x:' .. id, 'q', ARGV[2], 'b', ARGV[3], 'r', ARGV[4], 't', t)
redis.call('ZADD', P .. 'dead', t, id)
return 1
