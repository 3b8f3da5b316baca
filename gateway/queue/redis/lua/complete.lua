-- KEYS: the model's key prefix (keys.model_key: the results are of one model, one slot in a
-- cluster). ARGV: prefix, group, worker, max_attempts, lease_ms, this replica, then per
-- result: item id, kind (ok | final | retry) and lease attempt as one (`ok2`: the caller
-- checked the lease id),
-- then the result JSON to send to another replica's client ('' for a client the caller holds)
-- or, for a retry, the error message (three arguments a result: fewer to encode). A result
-- counts only from the current lease: the entry is held by `worker` at that attempt and the
-- input is still in it (not answered, not moved). Returns a status per result: 'a' accepted
-- (answer in its replica's reply stream, or requeued), 'l' accepted, the caller holds the
-- client (answer it there), 'l<client id>' accepted, the client is this replica's (answer it
-- here: no reply stream), 'd' dead letter, 'i' ignored.
local worker, max_att, lease_ms, here = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local out, entries, order = {}, {}, {}
-- the entry's state while this call runs (false: gone); owner and attempt only while leased
local function open(key, id)
  local at = id .. '@' .. key
  if entries[at] == nil then
    entries[at] = false
    local f = entry(key, id)
    if f then
      local e = {key = key, id = id, f = f, answered = {}, open = {}}
      for _, k in ipairs(left(key, id, f)) do e.open[k] = true end
      entries[at] = e
      order[#order + 1] = e
    end
  end
  return entries[at]
end
-- who holds the entry's lease and its attempt (nil: nobody); read once, at its first result
-- (nothing before that in this call changes the entry's pending-entries list)
local function lease(e)
  if e.leased == nil then
    e.leased = false
    local ok, p = pcall(redis.call, 'XPENDING', e.key, G, 'IDLE', 0, e.id, e.id, 1)
    if ok and #p == 1 then
      e.leased, e.owner, e.attempt = true, p[1][2], tonumber(e.f.a) + tonumber(p[1][4])
    end
  end
  return e.owner, e.attempt
end
for i = 7, #ARGV, 3 do
  local item, payload = ARGV[i], ARGV[i + 2]  -- payload: result JSON, or a retry's message
  local retry = string.byte(ARGV[i + 1]) == 114  -- 'r': retry
  local attempt = tonumber(string.match(ARGV[i + 1], '%d+$'))
  local id, k, key = string.match(item, '^([^/@]+)/(%d+)@(.+)$')
  local status, e = 'i', nil
  if id and base_of(key) == KEYS[1] then
    k = tonumber(k)
    e = open(key, id)
  end
  -- only from the current lease: its holder, its attempt, the input still in its entry
  if e and e.open[k] and lease(e) == worker and e.attempt == attempt then
    e.open[k] = nil
    if not retry then
      e.answered[#e.answered + 1] = k
      if payload == '' then  -- the caller holds the client and knows its id
        status = 'l'
      elseif e.f.r == here then
        status = 'l' .. client_id(e.f, k)
      else
        redis.call('XADD', reply_key(key, e.f.r), '*', 'i', client_id(e.f, k), 'r', payload)
        status = 'a'
      end
    elseif attempt >= max_att then
      dead_letter(key, id, e.f, {k}, attempt, payload); status = 'd'
    elseif next(e.open) == nil then  -- its last open input: the entry itself goes back
      put_back(key, id, lease_ms)
      status = 'a'
    else
      move(key, id, e.f, {k}, attempt); status = 'a'
    end
  end
  out[#out + 1] = status
end
local answered = {}  -- [counts key]: one INCRBY each for the call
for _, e in ipairs(order) do
  mark(e.key, e.id, e.f, e.answered, false, true)
  local counts = count_key(e.key)
  answered[counts] = (answered[counts] or 0) + #e.answered
end
for counts, n in pairs(answered) do
  if n > 0 then redis.call('INCRBY', counts, -n) end
end
return out
