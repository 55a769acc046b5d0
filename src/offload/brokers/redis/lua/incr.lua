-- Add to a counter, giving it a time to live when this creates it.
-- KEYS[1]: the counter's key (not the namespace prefix).
-- ARGV: amount, ttl in ms (0 = none). Returns the new value.
local existed = redis.call('EXISTS', KEYS[1])
local v = redis.call('INCRBY', KEYS[1], ARGV[1])
if existed == 0 and tonumber(ARGV[2]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return v
