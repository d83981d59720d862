-- publish_once's first part: a publication made with this idempotency key (KEYS[3]) is
-- answered as {offset, epoch, 1} and nothing else runs: no new epoch, nothing published.
local seen = redis.call('GET', KEYS[3])
if seen then
  local space = string.find(seen, ' ', 1, true)
  return {tonumber(string.sub(seen, 1, space - 1)), string.sub(seen, space + 1), 1}
end
