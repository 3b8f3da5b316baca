-- Shared by every script that takes the key prefix and the consumer group as ARGV[1], ARGV[2]
-- (scripts.py puts RELEASED, FRONT and DEAD_LETTER before it, from keys.py and store.py).
-- An entry's fields: r replica, q request id, a attempts before this entry (a requeued input
-- keeps its count), n inputs, t their estimated tokens; then its inputs as three lists in
-- input order (k = 1..n): k their estimated tokens and x their indices in the request
-- (comma-separated), s their specs (JSON, one per line: JSON text has no raw newline). Three
-- fields, not three per input: the entry is written, read and handed out whole, and a script
-- splits the lists only where it takes part of an entry.
local P, G = ARGV[1], ARGV[2]
local function tbl(a) local t = {} for i = 1, #a, 2 do t[a[i]] = a[i + 1] end return t end
-- a stream key is P .. '{<model>}:<kind>:<task>' (keys.py; no '}' in <model>: escaped): the
-- model is its hash tag, and every key of the model starts with its base P .. '{<model>}'
-- (one slot in a cluster)
local function parts(key) return string.match(key, '^(.*}):([^:]*):([^:]*)$') end
local function base_of(key) return (parts(key)) end
local function front_of(key)
  local base, kind, task = parts(key)
  return base .. ':' .. FRONT[kind] .. ':' .. task
end
local function entry(key, id)
  local e = redis.call('XRANGE', key, id, id)[1]
  if e then return tbl(e[2]) end
end
-- an entry's inputs no longer in it (answered, or moved to another entry): k -> ''
local function done_key(key, id) return P .. 'd:' .. id .. '@' .. key end
-- the unanswered-inputs count of a stream's line (of its model): interactive or batch
local function count_key(key)
  local base, kind = parts(key)
  return base .. ((kind == 'b' or kind == 'c') and ':nb' or ':n')
end
-- an entry's per-input lists (split once per entry and script run): tokens (numbers),
-- request indices and specs (strings)
local function split(list, sep, as_number)
  local out = {}
  for v in string.gmatch(list .. sep, '([^' .. sep .. ']*)' .. sep) do
    out[#out + 1] = as_number and tonumber(v) or v
  end
  return out
end
local function tokens_of(f) f.ts = f.ts or split(f.k, ',', true) return f.ts end
local function indices_of(f) f.xs = f.xs or split(f.x, ',') return f.xs end
local function specs_of(f) f.ss = f.ss or split(f.s, '\n') return f.ss end
local function client_id(f, k) return f.q .. ':' .. indices_of(f)[k] end
-- the replica holding an entry's client is alive (its heartbeat beside the entry's model)
local function alive(key, replica)
  return redis.call('EXISTS', base_of(key) .. ':replica:' .. replica) == 1
end
local function reply_key(key, replica) return base_of(key) .. ':reply:' .. replica end
-- the inputs (1..n) of an entry neither answered nor moved
local function left(key, id, f)
  local ks, n = {}, tonumber(f.n)
  local done = redis.call('HKEYS', done_key(key, id))
  if #done == 0 then for k = 1, n do ks[k] = k end return ks end
  local gone = {}
  for _, k in ipairs(done) do gone[tonumber(k) or 0] = true end
  for k = 1, n do if not gone[k] then ks[#ks + 1] = k end end
  return ks
end
local function finish(key, id)
  redis.call('XACK', key, G, id); redis.call('XDEL', key, id)
  redis.call('DEL', done_key(key, id))
end
-- inputs ks leave the entry: answered (no longer counted as unanswered, unless `counted`) or
-- moved (`moved`: they are counted in their new entry); the entry leaves the stream with its
-- last input
local function mark(key, id, f, ks, moved, counted)
  if #ks == 0 then return end
  if not moved and not counted then
    redis.call('INCRBY', count_key(key), -#ks)
  end
  local dk = done_key(key, id)
  local gone = redis.call('HLEN', dk)
  if gone == 0 and #ks >= tonumber(f.n) then finish(key, id) return end
  local args = {}
  for _, k in ipairs(ks) do args[#args + 1] = k; args[#args + 1] = '' end
  redis.call('HSET', dk, unpack(args))
  if gone + #ks >= tonumber(f.n) then finish(key, id) end
end
-- an entry goes back to the front of its line: claimed for the placeholder consumer with a
-- whole lease of idle time, so that the next pull takes it first; `deliveries`: its delivery
-- count from now on (nil: kept)
local function put_back(key, id, lease_ms, deliveries)
  if deliveries then
    redis.call('XCLAIM', key, G, RELEASED, 0, id, 'IDLE', lease_ms, 'RETRYCOUNT', deliveries,
               'JUSTID')
  else
    redis.call('XCLAIM', key, G, RELEASED, 0, id, 'IDLE', lease_ms, 'JUSTID')
  end
end
local function dead_letter(key, id, f, ks, attempts, last_error)
  local msg = string.format(DEAD_LETTER, attempts)
  if last_error ~= '' then msg = msg .. ' (the last attempt failed: ' .. last_error .. ')' end
  for _, k in ipairs(ks) do
    local result = cjson.encode({item_id = id .. '/' .. k .. '@' .. key, lease_id = '',
      error = {code = 'max_attempts_exceeded', message = msg .. '; giving up', retryable = false}})
    redis.call('XADD', reply_key(key, f.r), '*', 'i', client_id(f, k), 'r', result)
  end
  mark(key, id, f, ks, false)
end
-- inputs ks of an entry go to the front of the line as an entry of their own (the model's
-- front stream, read before its main stream), keeping their attempt count
local function move(key, id, f, ks, attempts)
  if #ks == 0 then return end
  local ts, xs, ss, tk, xk, sk, tokens = tokens_of(f), indices_of(f), specs_of(f), {}, {}, {}, 0
  for j, k in ipairs(ks) do
    tokens = tokens + ts[k]
    tk[j], xk[j], sk[j] = ts[k], xs[k], ss[k]
  end
  local front = front_of(key)
  redis.call('XADD', front, '*', 'r', f.r, 'q', f.q, 'a', attempts, 'n', #ks, 't', tokens,
             'k', table.concat(tk, ','), 'x', table.concat(xk, ','),
             's', table.concat(sk, '\n'))
  redis.call('SADD', base_of(key) .. ':active', front)
  mark(key, id, f, ks, true)
end
local function drop(key, id, f)  -- out of the stream unanswered; returns the inputs dropped
  local ks = left(key, id, f)
  redis.call('INCRBY', count_key(key), -#ks)
  finish(key, id)
  return #ks
end
