-- ARGV: prefix, group, SSCAN cursor. Over a page of the stream keys: a stream with no entries
-- whose model no worker advertises any longer (its advert key expired) is deleted, with the
-- model's zero counts. Returns {next cursor, streams deleted}.
local page = redis.call('SSCAN', P .. 'streams', ARGV[3], 'COUNT', 500)
local deleted = 0
for _, key in ipairs(page[2]) do
  local model = model_of(key)
  if redis.call('EXISTS', P .. 'advert:' .. model) == 0 and redis.call('XLEN', key) == 0 then
    redis.call('DEL', key)
    redis.call('SREM', P .. 'streams', key)
    redis.call('SREM', P .. 'active', key)
    local counts = count_key(key)
    if tonumber(redis.call('HGET', counts, model) or '1') <= 0 then
      redis.call('HDEL', counts, model)
    end
    deleted = deleted + 1
  end
end
return {page[1], deleted}
