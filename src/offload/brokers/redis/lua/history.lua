-- The history's page (Store.history): listed states newest queued first.
-- KEYS[1]: the namespace prefix.
-- ARGV: status, name, queue ('' = any), limit, before (queued_at, exclusive; '' = none).
-- Returns (task id, state) pairs flattened. Walks the smallest of the sorted sets the filters
-- name (h:all without one), checking the other filters against h:meta; a listing whose state
-- has expired but is not pruned yet is skipped.
local want_status, want_name, want_queue = ARGV[1], ARGV[2], ARGV[3]
local limit = tonumber(ARGV[4])
local filtered = want_status ~= '' or want_name ~= '' or want_queue ~= ''
local zset, smallest = P .. 'h:all', false
for _, candidate in ipairs({
  want_status ~= '' and P .. 'h:s:' .. want_status or false,
  want_name ~= '' and P .. 'h:n:' .. want_name or false,
  want_queue ~= '' and P .. 'h:q:' .. want_queue or false,
}) do
  if candidate then
    local n = redis.call('ZCARD', candidate)
    if not smallest or n < smallest then zset, smallest = candidate, n end
  end
end
local function wanted(id)
  if not filtered then return true end
  local listing = redis.call('HGET', P .. 'h:meta', id)
  if not listing then return false end
  local status, _, q, name = parse_listing(listing)
  return (want_status == '' or status == want_status) and (want_queue == '' or q == want_queue)
    and (want_name == '' or name == want_name)
end
local PAGE = 256
local out, found = {}, 0
-- Pages by score: the next one starts at the last score seen, inclusive, past the ids of that
-- score already read (equal scores come in the same order each time), so none is lost or read twice.
local top, skip = ARGV[5] ~= '' and '(' .. ARGV[5] or '+inf', 0
while found < limit do
  local page = redis.call('ZRANGE', zset, top, '-inf', 'BYSCORE', 'REV', 'LIMIT', skip, PAGE, 'WITHSCORES')
  for i = 1, #page, 2 do
    local id = page[i]
    if wanted(id) then
      local state = redis.call('GET', P .. 'state:' .. id)
      if state then
        out[#out + 1] = id
        out[#out + 1] = state
        found = found + 1
        if found >= limit then return out end
      end
    end
  end
  if #page < 2 * PAGE then break end
  local last = page[#page]
  if last == top then
    skip = skip + PAGE
  else
    top, skip = last, 0
    for i = 2, #page, 2 do
      if page[i] == last then skip = skip + 1 end
    end
  end
end
return out
