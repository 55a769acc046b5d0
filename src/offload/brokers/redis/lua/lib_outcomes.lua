-- Library: storing outcomes and acknowledging, as functions over a range of ARGV, so that a
-- worker whose results live in this same Redis does both in one script (settle.lua); needs
-- lib_common.lua and lib_history.lua.
-- ARGV[first..last]: (task id, state, final '1' or '0', listing) quadruples. ttl and done_ttl
-- in ms.
-- A final state is also the one element of done:<id> for a while, where blocked sync waiters
-- (BLMOVE from the list onto itself, which leaves it in place for the next waiter) pick it up,
-- and it goes with its change signal on task:<id>, which saves async waiters a read.
local function put_states(ttl, done_ttl, first, last)
  local t = now()
  for i = first, last, 4 do
    local id = ARGV[i]
    local k = P .. 'state:' .. id
    if ttl > 0 then
      redis.call('SET', k, ARGV[i + 1], 'PX', ttl)
    else
      redis.call('SET', k, ARGV[i + 1])
    end
    -- done:<id> holds the latest state only while it is final (a replayed task starts over).
    local d = P .. 'done:' .. id
    redis.call('DEL', d)
    if ARGV[i + 2] == '1' then
      redis.call('RPUSH', d, ARGV[i + 1])
      redis.call('PEXPIRE', d, done_ttl)
      redis.call('PUBLISH', P .. 'task:' .. id, ARGV[i + 1])
    else
      redis.call('PUBLISH', P .. 'task:' .. id, '')
    end
    list_state(id, ARGV[i + 3], ttl, t)
  end
  prune_history(8 + math.floor((last - first + 1) / 2), t)
end
-- ARGV[first..last]: (message id, receipt) pairs of messages whose outcome is stored. Only the
-- current lease holder's receipt (the delivery count of its lease) acknowledges; '' skips the
-- check. A worker whose lease ran out while another claimed the message must not take it from
-- under its new holder: its ack does nothing, and the new holder's lease goes on.
local function ack(first, last)
  for i = first, last, 2 do
    local id, tok = ARGV[i], ARGV[i + 1]
    local mk = P .. 'm:' .. id
    local v = redis.call('HMGET', mk, 'q', 'k', 'd')
    if v[1] and (tok == '' or v[3] == tok) then
      -- A message whose lease ran out may be back in its queue, taken by nobody since (the
      -- same delivery count); the outcome is stored all the same.
      if redis.call('ZREM', P .. 'lease', id) == 0 then
        redis.call('ZREM', P .. 'q:' .. v[1], id)
        redis.call('ZREM', P .. 'sched', id)
      end
      release_key(id, v[2])
      redis.call('DEL', mk)
    end
  end
  return math.floor((last - first + 1) / 2)
end
