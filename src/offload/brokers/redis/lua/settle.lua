-- A worker's outcomes in one step, in this order: store the states, acknowledge the messages,
-- and optionally lease the next ones (a claim that never waits).
-- KEYS[1]: the namespace prefix.
-- ARGV: ttl in ms (0 = none), ttl of a done list in ms, number of states n, n (task id, state,
-- final '1'/'0', listing) quadruples, number of acks m, m (message id, receipt) pairs (see ack() in
-- lib_outcomes.lua), then optionally the claim: token, lease_s, limit, queue... Returns claim()'s reply ({'0', ''} without a claim).
local n = tonumber(ARGV[3])
put_states(tonumber(ARGV[1]), tonumber(ARGV[2]), 4, 3 + 4 * n)
local a = 4 + 4 * n
local m = tonumber(ARGV[a])
ack(a + 1, a + 2 * m)
local c = a + 2 * m + 1
if c > #ARGV then return {'0', ''} end
return claim(ARGV[c], tonumber(ARGV[c + 1]), tonumber(ARGV[c + 2]), '', 0, '', {unpack(ARGV, c + 3)})
