-- Remove a message that is still queued or scheduled.
-- KEYS[1]: the namespace prefix.
-- ARGV: id. Returns 1 when removed, 0 when unknown or leased (running).
local id = ARGV[1]
local q = redis.call('HGET', P .. 'm:' .. id, 'q')
if not q then return 0 end
-- A leased message is in neither set: it is running and cannot be cancelled here.
if redis.call('ZREM', P .. 'q:' .. q, id) + redis.call('ZREM', P .. 'sched', id) == 0 then return 0 end
drop(id)
return 1
