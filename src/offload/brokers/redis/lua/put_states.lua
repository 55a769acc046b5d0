-- Store task states and signal their change (see put_states() in lib_outcomes.lua).
-- KEYS[1]: the namespace prefix.
-- ARGV: ttl in ms (0 = none), ttl of a done list in ms, then (task id, state, final '1'/'0',
-- listing) quadruples. Returns 1.
put_states(tonumber(ARGV[1]), tonumber(ARGV[2]), 3, #ARGV)
return 1
