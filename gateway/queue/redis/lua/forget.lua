-- KEYS: the model's key prefix (keys.model_key). ARGV: prefix, group. If no worker advertises
-- the model any longer (its advert key expired), its streams with no entries are deleted, with
-- its counts once they are zero. Returns {streams deleted, streams left}.
local base = KEYS[1]
if redis.call('EXISTS', base .. ':advert') == 1 then
  return {0, redis.call('SCARD', base .. ':streams')}
end
local deleted = 0
for _, key in ipairs(redis.call('SMEMBERS', base .. ':streams')) do
  if redis.call('XLEN', key) == 0 then
    redis.call('DEL', key)
    redis.call('SREM', base .. ':streams', key)
    redis.call('SREM', base .. ':active', key)
    deleted = deleted + 1
  end
end
local left = redis.call('SCARD', base .. ':streams')
if left == 0 then
  for _, counts in ipairs({base .. ':n', base .. ':nb'}) do
    if tonumber(redis.call('GET', counts) or '1') <= 0 then redis.call('DEL', counts) end
  end
end
return {deleted, left}
