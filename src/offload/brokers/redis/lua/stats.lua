-- Counts for this namespace, after moving due messages and expired leases to their queues.
-- KEYS[1]: the namespace prefix. No ARGV.
-- Returns scheduled, running, dead, then for every non-empty queue: its name, its ready count
-- and the age in seconds of its oldest ready message ('' when none of them says when it
-- became ready: messages enqueued by an offload that did not record it).
local t = now()
surface(t)
-- The earliest ready time ('r' in a message's hash) among the first messages of each
-- priority present in a queue. The score is (9 - priority) * 1e12 + arrival, so that is one
-- look per priority (ten at most), whatever the queue's length, and the first of a priority
-- is its oldest. Except for a message that came back (a retry, a due eta, an expired lease):
-- it keeps its arrival place, so it may stand first with a later ready time than those behind
-- it; the age is then under the true one until that message is claimed, which it is next.
local function oldest_ready(zk)
  local since = nil
  local from = '-inf'
  while true do
    local head = redis.call('ZRANGEBYSCORE', zk, from, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
    if not head[1] then return since end
    local r = tonumber(redis.call('HGET', P .. 'm:' .. head[1], 'r'))
    if r and (since == nil or r < since) then since = r end
    from = string.format('%.0f', (math.floor(tonumber(head[2]) / 1e12) + 1) * 1e12)
  end
end
local out = {redis.call('ZCARD', P .. 'sched'), redis.call('ZCARD', P .. 'lease'), redis.call('ZCARD', P .. 'dead')}
for _, q in ipairs(redis.call('SMEMBERS', P .. 'queues')) do
  local zk = P .. 'q:' .. q
  local n = redis.call('ZCARD', zk)
  if n > 0 then
    local since = oldest_ready(zk)
    out[#out + 1] = q; out[#out + 1] = n; out[#out + 1] = since and fmt(math.max(t - since, 0)) or ''
  end
end
return out
