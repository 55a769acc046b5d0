-- Move a message to the dead letters with its reason, wherever it was, and forget it.
-- KEYS[1]: the namespace prefix.
-- ARGV: id, receipt ('' skips the holder check), queue, body, reason.
-- Returns 1, or 0 (burying nothing) when a receipt is given and the message is gone or held
-- by a later lease: a worker whose lease ran out must not bury a message another now runs.
local id, tok = ARGV[1], ARGV[2]
local v = redis.call('HMGET', P .. 'm:' .. id, 'q', 'd')
local q = v[1]
if tok ~= '' and (not q or v[2] ~= tok) then return 0 end
if redis.call('ZREM', P .. 'lease', id) == 0 and q then
  redis.call('ZREM', P .. 'q:' .. q, id)
  redis.call('ZREM', P .. 'sched', id)
end
drop(id)
local t = fmt(now())
redis.call('HSET', P .. 'x:' .. id, 'q', ARGV[3], 'b', ARGV[4], 'r', ARGV[5], 't', t)
redis.call('ZADD', P .. 'dead', t, id)
return 1
