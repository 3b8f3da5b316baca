-- KEYS: the model's key prefix (keys.model_key). ARGV: prefix, group. Returns {unanswered,
-- leased}: unanswered from the counts of both lines (interactive and batch), leased = the
-- inputs left in entries a worker holds (the pending-entries lists of the model's streams
-- with entries, page by page).
local leased = 0
for _, key in ipairs(redis.call('SMEMBERS', KEYS[1] .. ':active')) do
  local start = '-'
  while true do
    local ok, pend = pcall(redis.call, 'XPENDING', key, G, start, '+', 1000)
    if not ok or #pend == 0 then break end
    for _, p in ipairs(pend) do
      if p[2] ~= RELEASED then
        local f = entry(key, p[1])
        if f then leased = leased + #left(key, p[1], f) end
      end
    end
    start = '(' .. pend[#pend][1]
  end
end
local unanswered = 0
for _, counts in ipairs({KEYS[1] .. ':n', KEYS[1] .. ':nb'}) do
  unanswered = unanswered + tonumber(redis.call('GET', counts) or '0')
end
return {unanswered, leased}
