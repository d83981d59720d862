-- After server_clock.lua and reap.lua: the live entries.
return redis.call('HVALS', KEYS[1])
