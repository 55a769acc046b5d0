-- Library put in front of every script that works on the namespace (see scripts.py).
-- KEYS[1]: the namespace prefix, ``offload:<namespace>:`` (P below).
-- Defines: now() (the server's clock), fmt() (a number as text with six decimals: Lua's own
-- conversion keeps only 14 significant digits), release_key, drop, wake, hand, surface.
local P = KEYS[1]
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function fmt(x) return string.format('%.6f', x) end
local function release_key(id, key)
  if key then
    local kk = P .. 'key:' .. key
    if redis.call('GET', kk) == id then redis.call('DEL', kk) end
  end
end
-- Forget a message that is no longer in any of q:<queue>, sched, lease.
local function drop(id)
  local mk = P .. 'm:' .. id
  release_key(id, redis.call('HGET', mk, 'k'))
  redis.call('DEL', mk)
end
-- Tell fetches blocked on the queue that it has ready messages; nobody listens otherwise.
local function wake(q, t)
  if redis.call('ZCOUNT', P .. 'waiters:' .. q, fmt(t), '+inf') > 0 then
    redis.call('PUBLISH', P .. 'wake:' .. q, '')
  end
end
-- Hand a ready message straight to a fetch blocked on its queue: lease it in that fetch's name
-- and publish it on the fetch's own channel, which saves the waiting worker the round trip of
-- a claim. False (nothing changed) when nobody waits or the waiter's connection is gone.
local function hand(id, q, t)
  local wk = P .. 'waiters:' .. q
  local w = redis.call('ZRANGEBYSCORE', wk, fmt(t), '+inf', 'LIMIT', 0, 1)[1]
  if not w then return false end
  local info = redis.call('GET', P .. 'waiting:' .. w)
  if not info then return false end
  info = cjson.decode(info)
  local mk = P .. 'm:' .. id
  local d = redis.call('HINCRBY', mk, 'd', 1)
  local body = redis.call('HGET', mk, 'b')
  local head = table.concat({#w, #id, #q, d}, ' ')
  if redis.call('PUBLISH', info[2], head .. '\n' .. w .. id .. q .. body) == 0 then
    redis.call('HINCRBY', mk, 'd', -1)
    return false
  end
  redis.call('ZADD', P .. 'lease', fmt(t + info[1]), id)
  -- As many messages as the fetch asked for; then it must claim (and register) again.
  info[4] = info[4] - 1
  if info[4] > 0 then
    redis.call('SET', P .. 'waiting:' .. w, cjson.encode(info), 'KEEPTTL')
  else
    for _, wq in ipairs(info[3]) do redis.call('ZREM', P .. 'waiters:' .. wq, w) end
    redis.call('DEL', P .. 'waiting:' .. w)
  end
  return true
end
-- Move due scheduled messages and expired leases into their ready queues (a bounded batch per
-- call; the rest follow on the next call), and wake the consumers of those queues.
local function surface(t)
  local woke = {}
  for _, src in ipairs({'sched', 'lease'}) do
    local zk = P .. src
    local due = redis.call('ZRANGEBYSCORE', zk, '-inf', fmt(t), 'WITHSCORES', 'LIMIT', 0, 500)
    for i = 1, #due, 2 do
      local id = due[i]
      redis.call('ZREM', zk, id)
      local mk = P .. 'm:' .. id
      local v = redis.call('HMGET', mk, 'q', 's')
      if v[1] then
        redis.call('ZADD', P .. 'q:' .. v[1], v[2], id)
        -- Ready since its eta or its lease's end (the score), not since now (see stats.lua).
        redis.call('HSET', mk, 'r', due[i + 1])
        woke[v[1]] = true
      end
    end
  end
  for q in pairs(woke) do wake(q, t) end
end
