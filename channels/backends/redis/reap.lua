-- Shared, after server_clock.lua. KEYS: entries hash, expiry zset. ARGV: the channel's
-- pub/sub topic. Drops the entries whose expiry passed and publishes a leave for each:
-- removal and leave in one script, so whichever worker gets there first announces a
-- client's leave, and only once. Leaves `stale`, the client ids it looked at.
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for i = 1, #stale do
    local entry = redis.call('HGET', KEYS[1], stale[i])
    if entry then
        redis.call('HDEL', KEYS[1], stale[i])
        redis.call('PUBLISH', ARGV[1], 'eleave ' .. entry)
    end
end
if #stale > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now) end
