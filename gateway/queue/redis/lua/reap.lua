-- KEYS: the model's key prefix (keys.model_key). ARGV: prefix, group, lease_ms,
-- max_attempts. Over the model's streams with entries (its active set): expired leases go
-- back to the front of their line (dead-lettered out of attempts); a stream found empty leaves
-- the set. Returns {stream, expired, dead, ...} for the streams where either is not 0.
local lease_ms, max_att = tonumber(ARGV[3]), tonumber(ARGV[4])
local out, active = {}, KEYS[1] .. ':active'
for _, key in ipairs(redis.call('SMEMBERS', active)) do
  local expired, dead = 0, 0
  local ok, pend = pcall(redis.call, 'XPENDING', key, G, 'IDLE', lease_ms, '-', '+', 1000)
  for _, p in ipairs(ok and pend or {}) do
    local id, owner, deliveries = p[1], p[2], tonumber(p[4])
    if owner ~= RELEASED then
      local f = entry(key, id)
      if f == nil then
        redis.call('XACK', key, G, id)
      else
        local attempts, ks = tonumber(f.a) + deliveries, left(key, id, f)
        if attempts >= max_att then
          dead_letter(key, id, f, ks, attempts, ''); dead = dead + #ks
        else
          put_back(key, id, lease_ms)
          expired = expired + #ks
        end
      end
    end
  end
  if expired + dead > 0 then
    out[#out + 1] = key; out[#out + 1] = expired; out[#out + 1] = dead
  end
  if redis.call('XLEN', key) == 0 then redis.call('SREM', active, key) end
end
return out
