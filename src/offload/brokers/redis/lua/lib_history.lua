-- Library: the history's index (Store.history), kept in step with the states; needs
-- lib_common.lua. A listing is 'status\31queued_at\31queue\31name' ('' for a state that is
-- not listed). Its state's id is in h:all, h:s:<status>, h:q:<queue> and h:n:<name>, sorted
-- sets scored by queued_at; h:meta maps the id to its listing (to move it when its status
-- changes, and to drop it), h:exp scores it by when its state expires (ms), for the prune.
local function parse_listing(listing)
  local status, at, q, name = string.match(listing, '^([^\31]*)\31([^\31]*)\31([^\31]*)\31(.*)$')
  return status, at, q, name
end
local function unlist(id, listing)
  local status, _, q, name = parse_listing(listing)
  redis.call('ZREM', P .. 'h:all', id)
  redis.call('ZREM', P .. 'h:s:' .. status, id)
  redis.call('ZREM', P .. 'h:q:' .. q, id)
  redis.call('ZREM', P .. 'h:n:' .. name, id)
  redis.call('HDEL', P .. 'h:meta', id)
end
-- File a state just written (kept for ttl ms, 0 = until deleted) under its listing. A task's
-- later states differ in their status only: they move between two status sets.
local function list_state(id, listing, ttl, t)
  local old = redis.call('HGET', P .. 'h:meta', id)
  if listing == '' then
    if old then unlist(id, old) end
    redis.call('ZREM', P .. 'h:exp', id)
    return
  end
  if old ~= listing then
    local status, at, q, name = parse_listing(listing)
    local ostatus, oat, oq, oname = false, false, false, false
    if old then ostatus, oat, oq, oname = parse_listing(old) end
    if old and oat == at and oq == q and oname == name then
      redis.call('ZREM', P .. 'h:s:' .. ostatus, id)
    else
      if old then unlist(id, old) end
      redis.call('ZADD', P .. 'h:all', at, id)
      redis.call('ZADD', P .. 'h:q:' .. q, at, id)
      redis.call('ZADD', P .. 'h:n:' .. name, at, id)
    end
    redis.call('ZADD', P .. 'h:s:' .. status, at, id)
    redis.call('HSET', P .. 'h:meta', id, listing)
  end
  -- h:exp is written when a task is first listed only: a later state lives longer than its
  -- first, and the prune moves the entry on to the state's actual expiry when it finds the
  -- state still there. That keeps a task's status changes and progress writes at two or
  -- three commands.
  if ttl == 0 then
    redis.call('ZREM', P .. 'h:exp', id)
  elseif not old then
    redis.call('ZADD', P .. 'h:exp', string.format('%.0f', t * 1000 + ttl), id)
  end
end
-- Drop up to n listings whose state has expired. Each write prunes more than it lists, so
-- the index never grows past the states it lists.
local function prune_history(n, t)
  local gone = redis.call('ZRANGEBYSCORE', P .. 'h:exp', '-inf', string.format('%.0f', t * 1000), 'LIMIT', 0, n)
  for _, id in ipairs(gone) do
    local left = redis.call('PTTL', P .. 'state:' .. id)
    if left > 0 then
      redis.call('ZADD', P .. 'h:exp', string.format('%.0f', t * 1000 + left), id)
    else
      if left == -2 then  -- the state is gone: so is its listing
        local listing = redis.call('HGET', P .. 'h:meta', id)
        if listing then unlist(id, listing) end
      end
      redis.call('ZREM', P .. 'h:exp', id)
    end
  end
end
