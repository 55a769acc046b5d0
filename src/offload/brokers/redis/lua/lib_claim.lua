-- Library: claim(), the lease of ready messages shared by claim.lua and settle.lua; needs
-- lib_common.lua.
-- claim(token, lease_s, limit, waiter, wait_s, hand_channel, queues):
--   token         names the call: the same token within a few seconds returns the same leases
--   lease_s       how long the leases last
--   limit         how many messages at most
--   waiter        the id under which the caller registers as waiting when nothing is ready
--   wait_s        how long the caller will wait if nothing is ready (0: not at all)
--   hand_channel  the caller's hand-off channel ('' = none; see hand() in lib_common.lua)
--   queues        a table of queue names, in the caller's order of preference
-- Returns {'1', id, queue, body, deliveries, ...} or {'0', seconds until something may become
-- ready ('' when nothing is scheduled or leased)}. The deliveries count is the lease's receipt.
local function claim(token, lease, limit, waiter, wait_s, hand_channel, queues)
  local memo_key = P .. 'claim:' .. token
  local out = {'1'}
  local memo = redis.call('GET', memo_key)
  if memo then
    -- The same call again: its reply was lost on a dropped connection. Hand out the same leases
    -- rather than leaving them stranded until they run out.
    for _, e in ipairs(cjson.decode(memo)) do
      local v = redis.call('HMGET', P .. 'm:' .. e[1], 'q', 'b', 'd')
      if v[1] and v[3] == e[2] and redis.call('ZSCORE', P .. 'lease', e[1]) then
        out[#out + 1] = e[1]; out[#out + 1] = v[1]; out[#out + 1] = v[2]; out[#out + 1] = v[3]
      end
    end
    return out
  end
  local t = now()
  surface(t)
  local picked = {}
  local nq = #queues
  if nq == 1 then
    local r = redis.call('ZPOPMIN', P .. 'q:' .. queues[1], limit)
    for i = 1, #r, 2 do picked[#picked + 1] = r[i] end
  else
    -- Merge the heads of the queues: priority first, then the order the queues were given in,
    -- then arrival.
    local cands = {}
    for qi = 1, nq do
      local q = queues[qi]
      local r = redis.call('ZRANGE', P .. 'q:' .. q, 0, limit - 1, 'WITHSCORES')
      for i = 1, #r, 2 do
        local s = tonumber(r[i + 1])
        cands[#cands + 1] = {math.floor(s / 1e12), qi, s, r[i], q}
      end
    end
    table.sort(cands, function(a, b)
      if a[1] ~= b[1] then return a[1] < b[1] end
      if a[2] ~= b[2] then return a[2] < b[2] end
      return a[3] < b[3]
    end)
    for i = 1, math.min(limit, #cands) do
      redis.call('ZREM', P .. 'q:' .. cands[i][5], cands[i][4])
      picked[#picked + 1] = cands[i][4]
    end
  end
  local deadline = fmt(t + lease)
  local leased = {}
  for _, id in ipairs(picked) do
    local mk = P .. 'm:' .. id
    local v = redis.call('HMGET', mk, 'q', 'b')
    if v[1] then
      local d = tostring(redis.call('HINCRBY', mk, 'd', 1))
      redis.call('ZADD', P .. 'lease', deadline, id)
      out[#out + 1] = id; out[#out + 1] = v[1]; out[#out + 1] = v[2]; out[#out + 1] = d
      leased[#leased + 1] = {id, d}
    end
  end
  if #leased > 0 then
    -- Kept while a retry can still come (the caller's operation timeout) and the leases last.
    local memo_ms = math.max(1, math.floor(math.min(lease, 35) * 1000))
    redis.call('SET', memo_key, cjson.encode(leased), 'PX', memo_ms)
    for _, q in ipairs(queues) do redis.call('ZREM', P .. 'waiters:' .. q, waiter) end
    redis.call('DEL', P .. 'waiting:' .. waiter)
    return out
  end
  if wait_s > 0 then
    -- Registered in the same step that found the queues empty, so no enqueue can slip between.
    -- The second of slack covers a caller that wakes a little after its own deadline.
    for _, q in ipairs(queues) do
      local wk = P .. 'waiters:' .. q
      redis.call('ZREMRANGEBYSCORE', wk, '-inf', fmt(t))
      redis.call('ZADD', wk, fmt(t + wait_s + 1), waiter)
    end
    if hand_channel ~= '' then
      -- What an enqueue needs to hand this fetch a message (see hand()).
      redis.call('SET', P .. 'waiting:' .. waiter, cjson.encode({lease, hand_channel, queues, limit}),
        'PX', math.floor((wait_s + 1) * 1000))
    end
  end
  local next_at = nil
  for _, src in ipairs({'sched', 'lease'}) do
    local r = redis.call('ZRANGE', P .. src, 0, 0, 'WITHSCORES')
    if r[2] then
      local s = tonumber(r[2])
      if next_at == nil or s < next_at then next_at = s end
    end
  end
  if next_at == nil then return {'0', ''} end
  return {'0', fmt(math.max(0, next_at - t))}
end
