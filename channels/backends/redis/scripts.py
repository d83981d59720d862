"""The Lua scripts of the backend, and ``Scripts``, which registers them on one client
(EVALSHA, with SCRIPT LOAD when Redis does not know one, e.g. after a restart)."""

from __future__ import annotations

from redis.asyncio import Redis

# KEYS: meta, stream. ARGV: new epoch, data, time, history size, history ttl ms, meta ttl ms,
# topic. Returns {offset, epoch}.
PUBLISH_LUA = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch)
end
local offset = redis.call('HINCRBY', KEYS[1], 'offset', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[6])
local size = tonumber(ARGV[4])
if size > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', size, string.format('0-%d', offset),
             'd', ARGV[2], 't', ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
end
redis.call('PUBLISH', ARGV[7],
           string.format('p%d ', offset) .. epoch .. ' ' .. ARGV[3] .. ' ' .. ARGV[2])
return {offset, epoch}
"""

# KEYS: meta, stream. ARGV: new epoch, meta ttl ms, since offset (-1: none), since epoch,
# limit (-1: none). Returns {epoch, top offset, status, entries}; status 0: incomplete,
# 1: entries oldest first, 2: entries newest first. A missing meta is created (offset 0,
# new epoch) so that an unknown channel has an epoch that the next publish keeps.
HISTORY_LUA = """
local state = redis.call('HMGET', KEYS[1], 'epoch', 'offset')
local epoch, top = state[1], tonumber(state[2])
if not epoch then
  epoch, top = ARGV[1], 0
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
local since, limit = tonumber(ARGV[3]), tonumber(ARGV[5])
if since < 0 then
  if limit == 0 then return {epoch, top, 1, {}} end
  if limit < 0 then return {epoch, top, 1, redis.call('XRANGE', KEYS[2], '-', '+')} end
  return {epoch, top, 2, redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', limit)}
end
if ARGV[4] ~= epoch or since > top then return {epoch, top, 0, {}} end
local first = top + 1
local head = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
if #head > 0 then first = tonumber(string.match(head[1][1], '%d+$')) end
if since < first - 1 then return {epoch, top, 0, {}} end
if since == top or limit == 0 then return {epoch, top, 1, {}} end
local start = string.format('0-%d', since + 1)
if limit < 0 then return {epoch, top, 1, redis.call('XRANGE', KEYS[2], start, '+')} end
return {epoch, top, 1, redis.call('XRANGE', KEYS[2], start, '+', 'COUNT', limit)}
"""

_NOW_MS = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""

# KEYS: entries hash, expiry zset. ARGV: client id, entry, ttl ms.
# Returns 1 when the entry was not there (new, or expired and reaped meanwhile).
PRESENCE_ADD_LUA = (
    _NOW_MS
    + """
local added = redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return added
"""
)

# KEYS: entries hash, expiry zset. ARGV: the channel's pub/sub topic. Drops the entries
# whose expiry passed and publishes a leave for each: removal and leave in one script,
# so whichever worker gets there first announces a client's leave, and only once.
_REAP = (
    _NOW_MS
    + """
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for i = 1, #stale do
    local entry = redis.call('HGET', KEYS[1], stale[i])
    if entry then
        redis.call('HDEL', KEYS[1], stale[i])
        redis.call('PUBLISH', ARGV[1], 'eleave ' .. entry)
    end
end
if #stale > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now) end
"""
)
PRESENCE_EXPIRE_LUA = _REAP + "return #stale\n"
PRESENCE_LUA = _REAP + "return redis.call('HVALS', KEYS[1])\n"  # the live entries


class Scripts:
    __slots__ = ("history", "presence_add", "presence_expire", "presence_list", "publish")

    def __init__(self, redis: Redis) -> None:
        self.publish = redis.register_script(PUBLISH_LUA)
        self.history = redis.register_script(HISTORY_LUA)
        self.presence_add = redis.register_script(PRESENCE_ADD_LUA)
        self.presence_list = redis.register_script(PRESENCE_LUA)
        self.presence_expire = redis.register_script(PRESENCE_EXPIRE_LUA)
