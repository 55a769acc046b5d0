-- Heartbeat: renew the leases of messages still running, by lease_s from now.
-- KEYS[1]: the namespace prefix.
-- ARGV: lease_s, then (id, receipt) pairs; an empty receipt skips the holder check.
-- Returns the ids whose receipt no longer holds the message (claimed again, or gone).
local deadline = fmt(now() + tonumber(ARGV[1]))
local lost = {}
for i = 2, #ARGV, 2 do
  local id, tok = ARGV[i], ARGV[i + 1]
  local v = redis.call('HMGET', P .. 'm:' .. id, 'q', 'd')
  if v[1] and (tok == '' or v[2] == tok) then
    if redis.call('ZSCORE', P .. 'lease', id) then
      redis.call('ZADD', P .. 'lease', deadline, id)
    elseif redis.call('ZREM', P .. 'q:' .. v[1], id) == 1 then
      -- The heartbeat came late: the lease ran out and the message went back to its queue, but
      -- nobody has taken it since (same delivery count). The worker still runs it; keep it.
      redis.call('ZADD', P .. 'lease', deadline, id)
    else
      lost[#lost + 1] = id
    end
  else
    lost[#lost + 1] = id
  end
end
return lost
