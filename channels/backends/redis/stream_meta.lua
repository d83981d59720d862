-- The channel's epoch and top offset (the first part of the publish and history scripts).
-- KEYS[1] is the meta, KEYS[2] the stream, ARGV[1] a new epoch.
--
-- The meta records the replication ID of the master that last wrote it. It is made anew
-- (new epoch, offset 0, history dropped) when it is missing, or when this server took
-- over from a failed master (it has a second replication ID) since the meta was written:
-- replication is asynchronous, so the last publications the old master acknowledged may
-- be gone, and their offsets must never be handed out again under the same epoch
-- (clients that held them get a gap instead). A server that only restarted (no second
-- ID) or received the key from another cluster node keeps the epoch: what its persistence
-- or the migration brought is what it has.
local info = redis.call('INFO', 'replication')
local replid = string.match(info, 'master_replid:(%x+)')
local promoted = string.match(info, 'master_replid2:(%x+)') ~= string.rep('0', 40)
local state = redis.call('HMGET', KEYS[1], 'epoch', 'offset', 'replid')
local epoch, top, fresh = state[1], tonumber(state[2]), false
if not epoch or (promoted and state[3] ~= replid) then
  epoch, top, fresh = ARGV[1], 0, true
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0, 'replid', replid)
elseif state[3] ~= replid then
  redis.call('HSET', KEYS[1], 'replid', replid)
end
