-- Remove a worker's registry record (its clean exit).
-- KEYS[1]: the namespace prefix. ARGV: worker id. Returns 1.
redis.call('ZREM', KEYS[1] .. 'workers', ARGV[1])
redis.call('HDEL', KEYS[1] .. 'workers:rec', ARGV[1])
return 1
