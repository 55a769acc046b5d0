-- Write or renew a worker's registry record, live for a time from the server's clock.
-- KEYS[1]: the namespace prefix. ARGV: worker id, record, time to live in ms. Returns 1.
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1] .. 'workers:rec', ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[1] .. 'workers', now_ms + tonumber(ARGV[3]), ARGV[1])
return 1
