-- Enqueue one message: into the schedule when its eta lies ahead, else handed straight to a
-- fetch blocked on its queue, else into the queue (waking its blocked fetches).
-- KEYS[1]: the namespace prefix.
-- ARGV: id, queue, body, priority (0-9), eta ('' = now), has_key ('1'/'0'), key, first state
-- ('' = none), the state's time to live in ms (0 = none), its listing (see lib_history.lua).
-- Returns the id, or the id of the queued or running message that holds the dedup key.
local id, q = ARGV[1], ARGV[2]
local mk = P .. 'm:' .. id
-- Enqueueing an id twice (a producer retrying) stores it once.
if redis.call('EXISTS', mk) == 1 then return id end
local key = false
if ARGV[6] == '1' then
  key = ARGV[7]
  local holder = redis.call('GET', P .. 'key:' .. key)
  if holder and redis.call('EXISTS', P .. 'm:' .. holder) == 1 then return holder end
  redis.call('SET', P .. 'key:' .. key, id)
end
local t = now()
if ARGV[8] ~= '' then
  -- The task's first state, stored before the message can be claimed.
  redis.call('DEL', P .. 'done:' .. id)
  local ttl = tonumber(ARGV[9])
  if ttl > 0 then
    redis.call('SET', P .. 'state:' .. id, ARGV[8], 'PX', ttl)
  else
    redis.call('SET', P .. 'state:' .. id, ARGV[8])
  end
  list_state(id, ARGV[10], ttl, t)
  prune_history(4, t)
end
local score = string.format('%.0f', (9 - tonumber(ARGV[4])) * 1e12 + redis.call('INCR', P .. 'seq'))
local eta = tonumber(ARGV[5])
local scheduled = eta and eta > t
-- r: when it is ready (its eta, or now), the time stats.lua ages a waiting message from.
redis.call('HSET', mk, 'q', q, 'b', ARGV[3], 's', score, 'd', '0', 'r', fmt(scheduled and eta or t))
if key then redis.call('HSET', mk, 'k', key) end
redis.call('SADD', P .. 'queues', q)
if scheduled then
  redis.call('ZADD', P .. 'sched', fmt(eta), id)
elseif not hand(id, q, t) then
  redis.call('ZADD', P .. 'q:' .. q, score, id)
  wake(q, t)
end
return id
