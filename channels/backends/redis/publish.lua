-- Assign the next offset, append to history, PUBLISH: atomically, so that offsets have no
-- gaps or duplicates and a publication is in history before anyone can see it live.
-- KEYS: meta, stream. ARGV: new epoch, data, time, history size, history ttl ms, meta ttl ms,
-- topic; for publish_once also KEYS[3] the idempotency key and ARGV[8] its ttl ms.
-- Returns {offset, epoch}. Follows stream_meta.lua (epoch, top).
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
if KEYS[3] then  -- publish_once: remember the key (publish_seen.lua)
  redis.call('SET', KEYS[3], offset .. ' ' .. epoch, 'PX', ARGV[8])
end
return {offset, epoch}
