-- Put a leased message back, optionally with a new body, ready at once or after a delay.
-- KEYS[1]: the namespace prefix.
-- ARGV: id, receipt ('' skips the holder check), has_body ('1'/'0'), body, delay_s.
-- Returns 1, or 0 when the message is unknown or held by another lease.
local id, tok = ARGV[1], ARGV[2]
local mk = P .. 'm:' .. id
local v = redis.call('HMGET', mk, 'q', 's', 'd')
-- Only the current holder may requeue: a worker whose lease ran out and was handed to another
-- must not pull the message from under it.
if not v[1] or (tok ~= '' and v[3] ~= tok) then return 0 end
if ARGV[3] == '1' then redis.call('HSET', mk, 'b', ARGV[4]) end
redis.call('ZREM', P .. 'lease', id)
redis.call('ZREM', P .. 'q:' .. v[1], id)
redis.call('ZREM', P .. 'sched', id)
local delay = tonumber(ARGV[5])
local t = now()
redis.call('HSET', mk, 'r', fmt(t + math.max(delay, 0)))
if delay > 0 then
  redis.call('ZADD', P .. 'sched', fmt(t + delay), id)
else
  redis.call('ZADD', P .. 'q:' .. v[1], v[2], id)
  wake(v[1], t)
end
return 1
