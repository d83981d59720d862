-- After server_clock.lua. KEYS: entries hash, expiry zset. ARGV: client id, entry, ttl ms.
-- Returns 1 when the entry was not there (new, or expired and reaped meanwhile).
local added = redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return added
