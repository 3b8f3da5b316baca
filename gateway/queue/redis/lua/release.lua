-- KEYS: the model's key prefix (keys.model_key: the items are of one model). ARGV: prefix,
-- group, worker, lease_ms, count_attempt (0 | 1), then (item id, lease attempt) pairs. A whole
-- entry goes back as it is; part of one, as an entry of its own. Returns the inputs released.
local worker, lease_ms, count = ARGV[3], tonumber(ARGV[4]), ARGV[5] == '1'
local asked, order, n = {}, {}, 0
for i = 6, #ARGV, 2 do
  local id, k, key = string.match(ARGV[i], '^([^/@]+)/(%d+)@(.+)$')
  if id and base_of(key) == KEYS[1] then
    local at = id .. '@' .. key
    if asked[at] == nil then
      asked[at] = {key = key, id = id, lease_a = tonumber(ARGV[i + 1]), ks = {}}
      order[#order + 1] = asked[at]
    end
    asked[at].ks[tonumber(k)] = true
  end
end
for _, r in ipairs(order) do
  local key, id = r.key, r.id
  local ok, p = pcall(redis.call, 'XPENDING', key, G, 'IDLE', 0, id, id, 1)
  local f = ok and #p == 1 and entry(key, id)
  if f and p[1][2] == worker and tonumber(f.a) + tonumber(p[1][4]) == r.lease_a then
    local open, back = left(key, id, f), tonumber(p[1][4])
    if not count then back = back - 1 end
    local ks = {}
    for _, k in ipairs(open) do if r.ks[k] then ks[#ks + 1] = k end end
    if #ks == #open then
      put_back(key, id, lease_ms, back)
    else
      move(key, id, f, ks, tonumber(f.a) + back)
    end
    n = n + #ks
  end
end
return n
