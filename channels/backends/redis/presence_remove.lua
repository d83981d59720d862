-- KEYS: entries hash, expiry zset. ARGV: client id. One call, so that a remove made on
-- the pub/sub connection with other calls is still all or nothing.
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
