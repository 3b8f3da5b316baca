-- KEYS: front stream, main stream (the interactive line of one model and task), then the same
-- two of its batch line. ARGV: prefix, group, worker, lease_ms, max_items, token budget (-1:
-- none; the first input passes whatever its size), max_attempts, batch inputs at most (-1: no
-- limit). Per line, interactive first: expired and released leases first (oldest first, front
-- stream first), then new entries. What does not fit of an entry is split off to the front.
-- Returns {rows..., dead, expired, dropped}: a row per entry taken (whole or in part), see
-- `take`.
local worker, lease_ms, max_items = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local budget, max_att, batch_room = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 0 then
    pcall(redis.call, 'XGROUP', 'CREATE', key, G, '0', 'MKSTREAM')
    -- dropped once no worker advertises its model
    redis.call('SADD', base_of(key) .. ':streams', key)
  end
end
local out, dead, expired, dropped, tokens, taken = {}, 0, 0, 0, 0, 0
local function full() return taken >= max_items or (budget >= 0 and tokens >= budget) end
-- how many of the inputs ks fit this pull (the rest of the entry is split off)
local function fitting(f, ks)
  if #ks == tonumber(f.n) and taken + #ks <= max_items
      and (budget < 0 or tokens + tonumber(f.t) <= budget) then
    return #ks  -- the whole entry (the lists need not be split)
  end
  local ts, m, t = tokens_of(f), 0, 0
  for _, k in ipairs(ks) do
    local tk = ts[k]
    if taken + m >= max_items or (budget >= 0 and taken + m > 0
                                  and tokens + t + tk > budget) then
      break
    end
    m, t = m + 1, t + tk
  end
  return m
end
-- hand out the first m of inputs ks (attempt `before` + 1) as one row {stream, entry id,
-- attempt, inputs (k list; '' for all n), then their k, x and s lists, request id}; the
-- rest goes to the front
local function take(key, id, f, ks, m, before)
  if m == tonumber(f.n) then
    out[#out + 1] = {key, id, before + 1, '', f.k, f.x, f.s, f.q}
    tokens = tokens + tonumber(f.t)
  else
    local ts, xs, ss, kk, tk, xk, sk = tokens_of(f), indices_of(f), specs_of(f), {}, {}, {}, {}
    for j = 1, m do
      local k = ks[j]
      kk[j], tk[j], xk[j], sk[j] = k, ts[k], xs[k], ss[k]
      tokens = tokens + ts[k]
    end
    out[#out + 1] = {key, id, before + 1, table.concat(kk, ','), table.concat(tk, ','),
                     table.concat(xk, ','), table.concat(sk, '\n'), f.q}
  end
  taken = taken + m
  if m < #ks then move(key, id, f, {unpack(ks, m + 1)}, before) end
end
for phase, line in ipairs({{KEYS[1], KEYS[2]}, {KEYS[3], KEYS[4]}}) do  -- interactive, batch
  if phase == 2 and batch_room >= 0 then max_items = math.min(max_items, taken + batch_room) end
  for _, key in ipairs(line) do
    local waiting = redis.call('XPENDING', key, G, 'IDLE', lease_ms, '-', '+', max_items + 64)
    for _, p in ipairs(waiting) do
      if full() then break end
      local id, owner, deliveries = p[1], p[2], tonumber(p[4])
      local f = entry(key, id)
      if f == nil then
        redis.call('XACK', key, G, id)
      elseif not alive(key, f.r) then
        dropped = dropped + drop(key, id, f)
      else
        local before, ks = tonumber(f.a) + deliveries, left(key, id, f)
        if before >= max_att then
          dead_letter(key, id, f, ks, before, ''); dead = dead + #ks
        else
          local m = fitting(f, ks)
          if m > 0 then
            redis.call('XCLAIM', key, G, worker, 0, id, 'RETRYCOUNT', deliveries + 1, 'JUSTID')
            if owner ~= RELEASED then expired = expired + #ks end
            take(key, id, f, ks, m, before)
          end
        end
      end
    end
  end
  for _, key in ipairs(line) do
    -- entries are read a few at a time: first one, then as many as fit if the next ones are
    -- as large as the largest read so far (inputs and tokens); those read that do not fit
    -- go back (rare: entries of one request are alike)
    local stop, want, per_n, per_t = false, 1, 1, 1
    while not (stop or full()) do
      local got = redis.call('XREADGROUP', 'GROUP', G, worker, 'COUNT', want, 'STREAMS', key, '>')
      if not got then break end
      local read = got[1][2]
      for _, e in ipairs(read) do
        local id = e[1]
        if stop then  -- read, not handed out: first in line next time, no attempt spent
          put_back(key, id, lease_ms, 0)
        else
          local f = tbl(e[2])
          per_n, per_t = math.max(per_n, tonumber(f.n)), math.max(per_t, tonumber(f.t))
          if not alive(key, f.r) then
            dropped = dropped + drop(key, id, f)
          else
            local ks = left(key, id, f)
            local m = fitting(f, ks)
            if m == 0 then  -- does not fit this pull: put back like the rest of the read
              put_back(key, id, lease_ms, 0)
              stop = true
            else
              take(key, id, f, ks, m, tonumber(f.a))
              stop = full()
            end
          end
        end
      end
      if #read < want then break end  -- the stream has no more new entries
      want = math.floor((max_items - taken) / per_n)
      if budget >= 0 then want = math.min(want, math.floor((budget - tokens) / per_t)) end
      want = math.max(1, want)
    end
  end
end
out[#out + 1] = dead; out[#out + 1] = expired; out[#out + 1] = dropped
return out
