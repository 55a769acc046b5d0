-- Forget messages whose outcome is stored (see ack() in lib_outcomes.lua).
-- KEYS[1]: the namespace prefix.
-- ARGV: id... Returns how many ids were given.
return ack(1, #ARGV)
