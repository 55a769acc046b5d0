-- Forget messages whose outcome is stored (see ack() in lib_outcomes.lua): only those whose
-- receipt is their current lease's.
-- KEYS[1]: the namespace prefix.
-- ARGV: (id, receipt) pairs; an empty receipt skips the holder check. Returns how many pairs.
return ack(1, #ARGV)
