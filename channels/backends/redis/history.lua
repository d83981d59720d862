-- A snapshot of the stream's top and the publications asked for, atomically.
-- KEYS: meta, stream. ARGV: new epoch, meta ttl ms, since offset (-1: none), since epoch,
-- limit (-1: none). Returns {epoch, top offset, status, entries}; status 0: incomplete,
-- 1: entries oldest first, 2: entries newest first. A missing meta is created (offset 0,
-- new epoch) so that an unknown channel has an epoch that the next publish keeps.
-- Follows stream_meta.lua (epoch, top, fresh).
if fresh then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
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
