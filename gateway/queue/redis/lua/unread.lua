-- KEYS: the model's key prefix (keys.model_key: the streams are of one model). ARGV: prefix,
-- group, worker, lease_ms, then (stream, entry id) pairs that a long poll read but did not
-- hand out: back to the front with no attempt spent.
local worker, lease_ms = ARGV[3], tonumber(ARGV[4])
for i = 5, #ARGV, 2 do
  local key, id = ARGV[i], ARGV[i + 1]
  local p = base_of(key) == KEYS[1] and redis.call('XPENDING', key, G, 'IDLE', 0, id, id, 1)
  if p and #p == 1 and p[1][2] == worker then put_back(key, id, lease_ms, tonumber(p[1][4]) - 1) end
end
