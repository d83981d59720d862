-- Shared, put first in the presence scripts: `now`, the Redis server's clock in ms, so
-- that every worker's entries expire by the same clock.
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
