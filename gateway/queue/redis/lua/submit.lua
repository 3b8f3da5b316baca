-- KEYS: main stream, front stream (of one model), the model's streams set, its active set,
-- its unanswered count, this replica's heartbeat beside the model. ARGV: prefix, group, limit,
-- replica, heartbeat TTL in ms, then per request: its id, its number of inputs, its number of
-- entries e, then e entries as five arguments each: inputs, estimated tokens, then the `k`,
-- `x` and `s` lists (see `RedisStore._entries`: the gateway cuts a request into entries).
-- Several requests of one line in one call (see `RedisStore.submit`), each whole or not at
-- all. Returns per request {-1, unanswered} over the limit, else {0, entry ids}.
local limit, replica = tonumber(ARGV[3]), ARGV[4]
for i = 1, 2 do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    pcall(redis.call, 'XGROUP', 'CREATE', KEYS[i], G, '0', 'MKSTREAM')
    redis.call('SADD', KEYS[3], KEYS[i])
  end
end
redis.call('SADD', KEYS[4], KEYS[1])  -- reaped and counted while it has entries
redis.call('SET', KEYS[6], '1', 'PX', ARGV[5])
local counts = KEYS[5]
local unanswered = tonumber(redis.call('GET', counts) or '0')
local added, out, at = 0, {}, 6
while at <= #ARGV do
  local q, n, e = ARGV[at], tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
  local first = at + 3
  at = first + 5 * e
  if unanswered + n > limit then
    out[#out + 1] = {-1, unanswered}
  else
    unanswered, added = unanswered + n, added + n
    local ids = {}
    for j = first, at - 1, 5 do
      ids[#ids + 1] = redis.call('XADD', KEYS[1], '*', 'r', replica, 'q', q, 'a', 0,
                                 'n', ARGV[j], 't', ARGV[j + 1], 'k', ARGV[j + 2],
                                 'x', ARGV[j + 3], 's', ARGV[j + 4])
    end
    out[#out + 1] = {0, ids}
  end
end
if added > 0 then redis.call('INCRBY', counts, added) end
return out
