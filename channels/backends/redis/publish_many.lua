-- publish.lua for several publications at once: the next offsets, consecutive, appended to
-- history and PUBLISHed as ONE batch message (keys.py), atomically.
-- KEYS: meta, stream. ARGV: new epoch, time, history size, history ttl ms, meta ttl ms,
-- topic, then the datas (at least one), in order. Returns {first offset, epoch}.
-- Follows stream_meta.lua (epoch, top).
local count = #ARGV - 6
local first = redis.call('HINCRBY', KEYS[1], 'offset', count) - count + 1
redis.call('PEXPIRE', KEYS[1], ARGV[5])
local size = tonumber(ARGV[3])
if size > 0 then
  -- The stream keeps the last `size` (exact MAXLEN): of a longer batch, the earlier ones
  -- would be trimmed by the same script before anyone could read them, so only the last
  -- `size` are added. The stream ends as if each had been XADDed.
  for i = math.max(1, count - size + 1), count do
    redis.call('XADD', KEYS[2], 'MAXLEN', size, string.format('0-%d', first + i - 1),
               'd', ARGV[6 + i], 't', ARGV[2])
  end
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
local lengths = {}
for i = 1, count do lengths[i] = #ARGV[6 + i] end
redis.call('PUBLISH', ARGV[6],
           string.format('b%d ', first) .. epoch .. ' ' .. ARGV[2] .. ' '
           .. table.concat(lengths, ',') .. ' ' .. table.concat(ARGV, '', 7))
return {first, epoch}
