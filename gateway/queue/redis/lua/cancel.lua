-- KEYS: front stream, main stream. ARGV: prefix, group, request id, then the entry ids the
-- request was queued as (in the main stream). Its inputs moved to the front stream go too.
local q = ARGV[3]
for i = 4, #ARGV do
  local f = entry(KEYS[2], ARGV[i])
  if f and f.q == q then drop(KEYS[2], ARGV[i], f) end
end
for _, e in ipairs(redis.call('XRANGE', KEYS[1], '-', '+')) do
  local f = tbl(e[2])
  if f.q == q then drop(KEYS[1], e[1], f) end
end
