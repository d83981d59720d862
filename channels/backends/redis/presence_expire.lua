-- After server_clock.lua and reap.lua: how many entries had lapsed.
return #stale
