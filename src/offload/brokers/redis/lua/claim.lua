-- Lease ready messages (see claim() in lib_claim.lua), registering the caller as waiting when
-- none is ready and it will wait.
-- KEYS[1]: the namespace prefix.
-- ARGV: token, lease_s, limit, waiter id, wait_s, the caller's hand-off channel ('' = none),
-- queue... Returns claim()'s reply.
return claim(ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5]), ARGV[6], {unpack(ARGV, 7)})
