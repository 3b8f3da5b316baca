-- ARGV: prefix, group. Returns {model, unanswered, leased, ...}: unanswered from the counts of
-- both lines (interactive and batch), leased = the inputs left in entries a worker holds (the
-- pending-entries lists of the streams with entries, page by page).
local leased = {}
for _, key in ipairs(redis.call('SMEMBERS', P .. 'active')) do
  local model, start = model_of(key), '-'
  while true do
    local ok, pend = pcall(redis.call, 'XPENDING', key, G, start, '+', 1000)
    if not ok or #pend == 0 then break end
    for _, p in ipairs(pend) do
      if p[2] ~= RELEASED then
        local f = entry(key, p[1])
        if f then leased[model] = (leased[model] or 0) + #left(key, p[1], f) end
      end
    end
    start = '(' .. pend[#pend][1]
  end
end
local unanswered, order = {}, {}
for _, counts in ipairs({P .. 'n', P .. 'nb'}) do
  local flat = redis.call('HGETALL', counts)
  for i = 1, #flat, 2 do
    if unanswered[flat[i]] == nil then order[#order + 1] = flat[i] end
    unanswered[flat[i]] = (unanswered[flat[i]] or 0) + tonumber(flat[i + 1])
  end
end
local out = {}
for _, model in ipairs(order) do
  out[#out + 1] = model; out[#out + 1] = unanswered[model]; out[#out + 1] = leased[model] or 0
end
return out
