-- Remove up to `chunk` ready messages of a queue; the caller loops, so that a huge queue never
-- blocks the server for long.
-- KEYS[1]: the namespace prefix.
-- ARGV: queue, chunk. Returns how many were removed.
local zk = P .. 'q:' .. ARGV[1]
local ids = redis.call('ZRANGE', zk, 0, tonumber(ARGV[2]) - 1)
for _, id in ipairs(ids) do
  redis.call('ZREM', zk, id)
  drop(id)
end
return #ids
