-- KEYS: entries hash, expiry zset. ARGV: client id, the channel's pub/sub topic. A client
-- leaving: its entry removed and its leave published, in one call; nothing published when
-- the entry is gone already (it lapsed and the script that removed it published the leave
-- then), so each leave goes out once.
local entry = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if not entry then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[2], 'eleave ' .. entry)
return 1
