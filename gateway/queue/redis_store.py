"""The Redis queue store: one queue shared by stateless gateway replicas (Redis >= 7 or Valkey),
through the official ``redis`` package's asyncio client.

Data model (every key under ``iw:``):

- ``iw:s:<task>:<model>`` — a Stream per (model, task), the line: one entry per chunk of a
  request (up to :data:`INPUTS_PER_ENTRY` inputs and :data:`TOKENS_PER_ENTRY` estimated
  tokens): the replica that holds the client's connection, the request id, and its inputs'
  :class:`~common.protocol.ItemSpec` (JSON), indices in the request and estimated tokens as
  three lists (eight fields an entry, whatever its size; see :data:`_LUA_HELPERS`).
  Consumer group ``workers``; a worker is a consumer. An input's item id is
  ``<entry id>/<input>@<stream>``.
- ``iw:f:<task>:<model>`` — the front of that line, read first: inputs split off an entry
  that a pull could not take whole, released or retried, as entries of their own that keep
  their attempt count.
- Leases are the groups' pending-entries lists: a pull claims entries for the worker (delivery
  count + the entry's earlier attempts = attempt); ``XPENDING ... IDLE <lease>`` finds expired
  leases, which go back to the front by being claimed for the placeholder consumer
  ``~released`` with an idle time of a whole lease (``XCLAIM ... IDLE ... JUSTID``), the way a
  released entry goes back too. Out of attempts, the dead letter, input by input.
- ``iw:d:<entry>@<stream>`` — the inputs that left an entry, answered or moved (and where to);
  the entry is ``XACK`` + ``XDEL``-ed with its last one. ``iw:n`` — unanswered inputs per model.
- ``iw:reply:<replica>`` — a Stream per gateway replica: results for the clients it holds,
  written by whichever replica a worker posted to, read by its owner (``XREAD BLOCK``).
- ``iw:replica:<replica>`` — the replica's heartbeat (TTL :data:`REPLICA_TTL_SECONDS`); inputs
  of a replica that is gone are dropped instead of processed for nobody.
- ``iw:worker:<worker_id>`` — a worker's adverts, TTL = the worker TTL, refreshed by its pulls
  (also during a long poll); ``iw:advert:<model>`` the latest advert of a model;
  ``iw:streams`` the set of stream keys.

Where two writes must happen together the work is a Lua script (atomic in Redis). Scripts
derive some key names from their arguments: use one Redis server (or a primary), not a Redis
Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from common.protocol import (
    BATCH_PRIORITY,
    ErrorCode,
    ItemError,
    ItemResult,
    ItemSpec,
    ModelAdvert,
    WorkItem,
)
from gateway import metrics
from gateway.queue.store import (
    BatchIndex,
    Completion,
    QueueFull,
    QueueStore,
    Request,
    StoreUnavailable,
    check_result,
    count_advert,
    prompt_token_limit,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
V = TypeVar("V")

PREFIX = "iw:"
GROUP = "workers"
#: The random key lease ids are signed with (one per Redis, made by the first replica).
LEASE_KEY = f"{PREFIX}lease-key"
#: Batch records (a hash by batch id) and, under ``<BATCHES>:...``, their indexes.
BATCHES = f"{PREFIX}batches"
#: An item id: ``<entry id>/<input>@<stream key>`` of a line (``s``, ``f``, ``b``, ``c``).
_ITEM_ID = re.compile(rf"\d+-\d+/\d+@{re.escape(PREFIX)}[sfbc]:(?:embed|score|classify):[^\n]+\Z")
#: Models whose adverts one replica caches (a name a client made up is one of them).
ADVERTS_CACHED = 1024
#: Seconds between two passes over the streams for those of models no worker serves.
FORGET_SECONDS = 60.0
#: Seconds an answer that arrived before its request's futures is kept for them.
EARLY_RESULT_SECONDS = 60.0
#: Seconds between two heartbeats of a replica.
HEARTBEAT_SECONDS = 5.0
#: Seconds a replica's heartbeat key (and its reply stream) outlives its last beat: inputs of
#: a replica silent this long are dropped, not worked on for nobody. Long enough to outlast a
#: Redis restart.
REPLICA_TTL_SECONDS = 60
#: Inputs of one request per stream entry at most (a 2,048-input request is 64 entries); one
#: entry is leased as a whole unless it is more than a pull can take.
INPUTS_PER_ENTRY = 32
#: Estimated tokens per stream entry at most (an input over it is an entry of its own).
TOKENS_PER_ENTRY = 4096
#: Inputs per SUBMIT call at most: requests of one line that arrive while a SUBMIT of that
#: line is in flight go together in the next call, up to this many inputs (one request always
#: whole).
INPUTS_PER_SUBMIT = 1024

#: Every script's ARGV starts with the key prefix and the consumer group. An entry's fields:
#: ``r`` replica, ``q`` request id, ``a`` attempts before this entry (a requeued input keeps
#: its count), ``n`` inputs, ``t`` their estimated tokens; then its inputs as three lists in
#: input order (k = 1..n): ``k`` their estimated tokens and ``x`` their indices in the request
#: (comma-separated), ``s`` their specs (JSON, one per line: JSON text has no raw newline).
#: Three fields, not three per input: the entry is written, read and handed out whole, and a
#: script splits the lists only where it takes part of an entry.
_LUA_HELPERS = """
local P, G = ARGV[1], ARGV[2]
local function tbl(a) local t = {} for i = 1, #a, 2 do t[a[i]] = a[i + 1] end return t end
local function model_of(key) return string.match(key, '^[^:]*:[^:]*:[^:]*:(.*)$') end
local FRONT = {s = 'f', f = 'f', b = 'c', c = 'c'}
local function front_of(key)
  return P .. FRONT[string.sub(key, #P + 1, #P + 1)] .. string.sub(key, #P + 2)
end
local function entry(key, id)
  local e = redis.call('XRANGE', key, id, id)[1]
  if e then return tbl(e[2]) end
end
-- an entry's inputs no longer in it (answered, or moved to another entry): k -> ''
local function done_key(key, id) return P .. 'd:' .. id .. '@' .. key end
-- the unanswered-inputs counts of a stream's line (per model): interactive or batch
local function count_key(key)
  local kind = string.sub(key, #P + 1, #P + 1)
  return P .. ((kind == 'b' or kind == 'c') and 'nb' or 'n')
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
local function specs_of(f) f.ss = f.ss or split(f.s, '\\n') return f.ss end
local function client_id(f, k) return f.q .. ':' .. indices_of(f)[k] end
local function alive(replica) return redis.call('EXISTS', P .. 'replica:' .. replica) == 1 end
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
    redis.call('HINCRBY', count_key(key), model_of(key), -#ks)
  end
  local dk = done_key(key, id)
  local gone = redis.call('HLEN', dk)
  if gone == 0 and #ks >= tonumber(f.n) then finish(key, id) return end
  local args = {}
  for _, k in ipairs(ks) do args[#args + 1] = k; args[#args + 1] = '' end
  redis.call('HSET', dk, unpack(args))
  if gone + #ks >= tonumber(f.n) then finish(key, id) end
end
local function dead_letter(key, id, f, ks, attempts, last_error)
  local msg = 'the input was delivered to workers ' .. attempts .. ' times without a result'
  if last_error ~= '' then msg = msg .. ' (the last attempt failed: ' .. last_error .. ')' end
  for _, k in ipairs(ks) do
    local result = cjson.encode({item_id = id .. '/' .. k .. '@' .. key, lease_id = '',
      error = {code = 'max_attempts_exceeded', message = msg .. '; giving up', retryable = false}})
    redis.call('XADD', P .. 'reply:' .. f.r, '*', 'i', client_id(f, k), 'r', result)
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
             's', table.concat(sk, '\\n'))
  redis.call('SADD', P .. 'active', front)
  mark(key, id, f, ks, true)
end
local function drop(key, id, f)  -- out of the stream unanswered; returns the inputs dropped
  local ks = left(key, id, f)
  redis.call('HINCRBY', count_key(key), model_of(key), -#ks)
  finish(key, id)
  return #ks
end
"""

#: KEYS: main stream, front stream, streams set. ARGV: prefix, group, limit, replica, model,
#: then per request: its id, its number of inputs, its number of entries e, then e entries as
#: five arguments each: inputs, estimated tokens, then the ``k``, ``x`` and ``s`` lists (see
#: ``RedisStore._entries``: the gateway cuts a request into entries). Several requests of one
#: line in one call (see ``RedisStore.submit``), each whole or not at all. Returns per request
#: {-1, unanswered} over the limit, else {0, entry ids}.
_SUBMIT = (
    _LUA_HELPERS
    + """
local limit, replica, model = tonumber(ARGV[3]), ARGV[4], ARGV[5]
for i = 1, 2 do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    pcall(redis.call, 'XGROUP', 'CREATE', KEYS[i], G, '0', 'MKSTREAM')
    redis.call('SADD', KEYS[3], KEYS[i])
  end
end
redis.call('SADD', P .. 'active', KEYS[1])  -- reaped and counted while it has entries
local counts = count_key(KEYS[1])
local unanswered = tonumber(redis.call('HGET', counts, model) or '0')
local added, out, at = 0, {}, 6
while at <= #ARGV do
  local q, n, e = ARGV[at], tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
  local first = at + 3
  at = first + 5 * e
  if unanswered + n > limit then
    out[#out + 1] = {-1, unanswered}
  else
    unanswered, added = unanswered + n, added + n
    local ids = {}
    for j = first, at - 1, 5 do
      ids[#ids + 1] = redis.call('XADD', KEYS[1], '*', 'r', replica, 'q', q, 'a', 0,
                                 'n', ARGV[j], 't', ARGV[j + 1], 'k', ARGV[j + 2],
                                 'x', ARGV[j + 3], 's', ARGV[j + 4])
    end
    out[#out + 1] = {0, ids}
  end
end
if added > 0 then redis.call('HINCRBY', counts, model, added) end
return out
"""
)

#: KEYS: front stream, main stream (the interactive line of one model and task), then the
#: same two of its batch line. ARGV: prefix, group, worker, lease_ms, max_items, token budget
#: (-1: none; the first input passes whatever its size), max_attempts, batch inputs at most
#: (-1: no limit), then the worker's registration (none: ''): its adverts as JSON, their TTL
#: in ms, the models' advert TTL in ms, then (model, advert JSON) pairs. Per line,
#: interactive first: expired and released leases first (oldest first, front stream first),
#: then new entries.
#: What does not fit of an entry is split off to the front. Returns {rows..., dead, expired,
#: dropped}: a row per entry taken (whole or in part), see ``take``.
_PULL = (
    _LUA_HELPERS
    + """
local worker, lease_ms, max_items = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local budget, max_att, batch_room = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
if ARGV[9] ~= '' then
  redis.call('SET', P .. 'worker:' .. worker, ARGV[9], 'PX', ARGV[10])
  for i = 12, #ARGV, 2 do
    redis.call('SET', P .. 'advert:' .. ARGV[i], ARGV[i + 1], 'PX', ARGV[11])
  end
end
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 0 then
    pcall(redis.call, 'XGROUP', 'CREATE', key, G, '0', 'MKSTREAM')
    redis.call('SADD', P .. 'streams', key)  -- dropped once no worker advertises its model
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
                     table.concat(xk, ','), table.concat(sk, '\\n'), f.q}
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
      elseif not alive(f.r) then
        dropped = dropped + drop(key, id, f)
      else
        local before, ks = tonumber(f.a) + deliveries, left(key, id, f)
        if before >= max_att then
          dead_letter(key, id, f, ks, before, ''); dead = dead + #ks
        else
          local m = fitting(f, ks)
          if m > 0 then
            redis.call('XCLAIM', key, G, worker, 0, id, 'RETRYCOUNT', deliveries + 1, 'JUSTID')
            if owner ~= '~released' then expired = expired + #ks end
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
          redis.call('XCLAIM', key, G, '~released', 0, id, 'IDLE', lease_ms,
                     'RETRYCOUNT', 0, 'JUSTID')
        else
          local f = tbl(e[2])
          per_n, per_t = math.max(per_n, tonumber(f.n)), math.max(per_t, tonumber(f.t))
          if not alive(f.r) then
            dropped = dropped + drop(key, id, f)
          else
            local ks = left(key, id, f)
            local m = fitting(f, ks)
            if m == 0 then  -- does not fit this pull: put back like the rest of the read
              redis.call('XCLAIM', key, G, '~released', 0, id, 'IDLE', lease_ms,
                         'RETRYCOUNT', 0, 'JUSTID')
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
"""
)

#: ARGV: prefix, group, worker, max_attempts, lease_ms, this replica, then per result: item
#: id, kind (ok | final | retry) and lease attempt as one (``ok2``: the caller checked the
#: lease id), then the result JSON to send to another replica's client ('' for a client the
#: caller holds) or, for a retry, the error message (three arguments a result: fewer to
#: encode). A result counts only from the current lease: the entry is held by ``worker`` at
#: that attempt and the input is still in it (not answered, not moved). Returns a status per
#: result:
#: 'a' accepted (answer in its replica's reply stream, or requeued), 'l' accepted, the caller
#: holds the client (answer it there), 'l<client id>' accepted, the client is this replica's
#: (answer it here: no reply stream), 'd' dead letter, 'i' ignored.
_COMPLETE = (
    _LUA_HELPERS
    + """
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
  if id then
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
        redis.call('XADD', P .. 'reply:' .. e.f.r, '*', 'i', client_id(e.f, k), 'r', payload)
        status = 'a'
      end
    elseif attempt >= max_att then
      dead_letter(key, id, e.f, {k}, attempt, payload); status = 'd'
    elseif next(e.open) == nil then  -- its last open input: the entry itself goes back
      redis.call('XCLAIM', key, G, '~released', 0, id, 'IDLE', lease_ms, 'JUSTID')
      status = 'a'
    else
      move(key, id, e.f, {k}, attempt); status = 'a'
    end
  end
  out[#out + 1] = status
end
local answered = {}  -- [counts key][model]: one HINCRBY each for the call
for _, e in ipairs(order) do
  mark(e.key, e.id, e.f, e.answered, false, true)
  local counts, model = count_key(e.key), model_of(e.key)
  answered[counts] = answered[counts] or {}
  answered[counts][model] = (answered[counts][model] or 0) + #e.answered
end
for counts, models in pairs(answered) do
  for model, n in pairs(models) do
    if n > 0 then redis.call('HINCRBY', counts, model, -n) end
  end
end
return out
"""
)

#: ARGV: prefix, group, worker, lease_ms, count_attempt (0 | 1), then (item id, lease
#: attempt) pairs. A whole entry goes back as it is; part of one, as an entry of its own.
#: Returns the inputs released.
_RELEASE = (
    _LUA_HELPERS
    + """
local worker, lease_ms, count = ARGV[3], tonumber(ARGV[4]), ARGV[5] == '1'
local asked, order, n = {}, {}, 0
for i = 6, #ARGV, 2 do
  local id, k, key = string.match(ARGV[i], '^([^/@]+)/(%d+)@(.+)$')
  if id then
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
      redis.call('XCLAIM', key, G, '~released', 0, id, 'IDLE', lease_ms,
                 'RETRYCOUNT', back, 'JUSTID')
    else
      move(key, id, f, ks, tonumber(f.a) + back)
    end
    n = n + #ks
  end
end
return n
"""
)

#: ARGV: prefix, group, worker, lease_ms, then (stream, entry id) pairs that a long poll read
#: but did not hand out: back to the front with no attempt spent.
_UNREAD = """
local G, worker, lease_ms = ARGV[2], ARGV[3], tonumber(ARGV[4])
for i = 5, #ARGV, 2 do
  local key, id = ARGV[i], ARGV[i + 1]
  local p = redis.call('XPENDING', key, G, 'IDLE', 0, id, id, 1)
  if #p == 1 and p[1][2] == worker then
    redis.call('XCLAIM', key, G, '~released', 0, id, 'IDLE', lease_ms,
               'RETRYCOUNT', tonumber(p[1][4]) - 1, 'JUSTID')
  end
end
"""

#: KEYS: the batch's runner key. ARGV: runner, ms. 1 if the runner holds it now.
_CLAIM = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

#: KEYS: front stream, main stream. ARGV: prefix, group, request id, then the entry ids the
#: request was queued as (in the main stream). Its inputs moved to the front stream go too.
_CANCEL = (
    _LUA_HELPERS
    + """
local q = ARGV[3]
for i = 4, #ARGV do
  local f = entry(KEYS[2], ARGV[i])
  if f and f.q == q then drop(KEYS[2], ARGV[i], f) end
end
for _, e in ipairs(redis.call('XRANGE', KEYS[1], '-', '+')) do
  local f = tbl(e[2])
  if f.q == q then drop(KEYS[1], e[1], f) end
end
"""
)

#: ARGV: prefix, group, lease_ms, max_attempts. Over the streams with entries (``iw:active``):
#: expired leases go back to the front of their line (dead-lettered out of attempts); a
#: stream found empty leaves the set. Returns {stream, expired, dead, ...} for the streams
#: where either is not 0.
_REAP = (
    _LUA_HELPERS
    + """
local lease_ms, max_att = tonumber(ARGV[3]), tonumber(ARGV[4])
local out = {}
for _, key in ipairs(redis.call('SMEMBERS', P .. 'active')) do
  local expired, dead = 0, 0
  local ok, pend = pcall(redis.call, 'XPENDING', key, G, 'IDLE', lease_ms, '-', '+', 1000)
  for _, p in ipairs(ok and pend or {}) do
    local id, owner, deliveries = p[1], p[2], tonumber(p[4])
    if owner ~= '~released' then
      local f = entry(key, id)
      if f == nil then
        redis.call('XACK', key, G, id)
      else
        local attempts, ks = tonumber(f.a) + deliveries, left(key, id, f)
        if attempts >= max_att then
          dead_letter(key, id, f, ks, attempts, ''); dead = dead + #ks
        else
          redis.call('XCLAIM', key, G, '~released', 0, id, 'IDLE', lease_ms, 'JUSTID')
          expired = expired + #ks
        end
      end
    end
  end
  if expired + dead > 0 then
    out[#out + 1] = key; out[#out + 1] = expired; out[#out + 1] = dead
  end
  if redis.call('XLEN', key) == 0 then redis.call('SREM', P .. 'active', key) end
end
return out
"""
)

#: ARGV: prefix, group. Returns {model, unanswered, leased, ...}: unanswered from the counts
#: of both lines (interactive and batch), leased = the inputs left in entries a worker holds
#: (the pending-entries lists of the streams with entries, page by page).
_COUNTS = (
    _LUA_HELPERS
    + """
local leased = {}
for _, key in ipairs(redis.call('SMEMBERS', P .. 'active')) do
  local model, start = model_of(key), '-'
  while true do
    local ok, pend = pcall(redis.call, 'XPENDING', key, G, start, '+', 1000)
    if not ok or #pend == 0 then break end
    for _, p in ipairs(pend) do
      if p[2] ~= '~released' then
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
"""
)

#: ARGV: prefix, group, SSCAN cursor. Over a page of the stream keys: a stream with no entries
#: whose model no worker advertises any longer (its advert key expired) is deleted, with the
#: model's zero counts. Returns {next cursor, streams deleted}.
_FORGET = (
    _LUA_HELPERS
    + """
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
"""
)

#: KEYS: the batch records (hash), the owner's index (zset by created_at), the running
#: batches (set), the owner's running batches (set), the ended ones (zset by ended_at), the
#: owners (hash). ARGV: batch id, record, created_at, ended_at ('' while it runs), owner.
_SAVE_BATCH = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[6], ARGV[1], ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
if ARGV[4] == '' then
  redis.call('SADD', KEYS[3], ARGV[1]); redis.call('SADD', KEYS[4], ARGV[1])
else
  redis.call('SREM', KEYS[3], ARGV[1]); redis.call('SREM', KEYS[4], ARGV[1])
  redis.call('ZADD', KEYS[5], ARGV[4], ARGV[1])
end
"""


def _keep(cache: dict[str, tuple[float, V]], key: str, value: V) -> None:
    """Store ``value`` stamped now, last in the dict: its order stays the order of the
    stamps (what :func:`_forget_older` relies on)."""
    cache.pop(key, None)
    cache[key] = (time.monotonic(), value)


def _forget_older(cache: dict[str, tuple[float, Any]], seconds: float) -> None:
    """Drop the entries stamped by :func:`_keep` more than ``seconds`` ago (oldest first)."""
    cutoff = time.monotonic() - seconds
    while cache:
        oldest = next(iter(cache))
        if cache[oldest][0] >= cutoff:
            break
        del cache[oldest]


#: Stream kinds: interactive line and its front, batch line and its front.
_FRONT = {"s": "f", "f": "f", "b": "c", "c": "c"}


def stream_key(model: str, task: str, priority: int | None = None) -> str:
    """The line of a model and task: ``iw:s:...`` interactive, ``iw:b:...`` batch."""
    kind = "b" if priority == BATCH_PRIORITY else "s"
    return f"{PREFIX}{kind}:{task}:{model}"


def _front(key: str) -> str:
    """The front stream of a line: inputs put back before it (split off a pulled entry,
    released, or to be retried)."""
    kind = key[len(PREFIX)]
    return f"{PREFIX}{_FRONT[kind]}{key[len(PREFIX) + 1 :]}"


def _batch_line(key: str) -> str:
    """The batch line beside an interactive line."""
    return f"{PREFIX}b{key[len(PREFIX) + 1 :]}"


def _model_of(key: str) -> str:
    return key.split(":", 3)[3]


def _entries(specs: list[ItemSpec]) -> list[list[Any]]:
    """A request's inputs cut into stream entries (consecutive inputs, up to
    :data:`INPUTS_PER_ENTRY` and :data:`TOKENS_PER_ENTRY` estimated tokens; an input over it
    is an entry of its own), each as the SUBMIT script's five arguments: inputs, estimated
    tokens, then the ``k``, ``x`` and ``s`` lists (see :data:`_LUA_HELPERS`)."""
    cuts: list[tuple[int, int, list[int]]] = []  # (first input, its end, estimated tokens)
    first, tokens = 0, [spec.estimate_tokens() for spec in specs]
    total = 0
    for i, t in enumerate(tokens):
        if i > first and (i - first >= INPUTS_PER_ENTRY or total + t > TOKENS_PER_ENTRY):
            cuts.append((first, i, tokens[first:i]))
            first, total = i, 0
        total += t
    cuts.append((first, len(specs), tokens[first:]))
    return [
        [
            end - start,
            sum(est),
            ",".join(map(str, est)),
            ",".join(map(str, range(start, end))),
            "\n".join(s.model_dump_json(exclude_none=True) for s in specs[start:end]),
        ]
        for start, end, est in cuts
    ]


def _inputs(
    key: str, entry_id: str, ks: bytes, tokens: bytes, indices: bytes, specs: bytes
) -> list[tuple[str, int, bytes, bytes]]:
    """Inputs of an entry from its lists: all of them (``ks`` empty) or the part ``ks``
    (comma-separated input numbers): (item id, estimated tokens, request index, spec JSON)
    each. Raises ValueError if the lists differ in length."""
    est = tokens.split(b",")
    numbers = ks.decode().split(",") if ks else range(1, len(est) + 1)
    return [
        (f"{entry_id}/{k}@{key}", int(t), x, spec)
        for k, t, x, spec in zip(numbers, est, indices.split(b","), specs.split(b"\n"), strict=True)
    ]


@dataclass(eq=False)
class _Submission:
    """A request waiting to be sent: its id, specs, stream entries (:func:`_entries`) and the
    caller's waiter."""

    request_id: str
    specs: list[ItemSpec]
    entries: list[list[Any]]
    waiter: asyncio.Future[Request]


def _fail(batch: list[_Submission], error: Exception) -> None:
    for sub in batch:
        if not sub.waiter.done():
            sub.waiter.set_exception(error)


@dataclass(eq=False)
class _StreamRequest(Request):
    """A request in the Redis store: also its entries (``<entry id>@<main stream>``)."""

    entries: list[str] = field(default_factory=list)


class RedisStore(QueueStore):
    """:class:`~gateway.queue.store.QueueStore` on Redis Streams (see the module docstring).

    ``url``: ``redis://[:password@]host:port/db`` or ``rediss://`` (TLS); ``password`` (e.g.
    read from ``GATEWAY_QUEUE_PASSWORD_FILE``) wins over the URL's."""

    def __init__(
        self,
        url: str,
        *,
        password: str | None = None,
        lease_seconds: float = 30.0,
        max_attempts: int = 3,
        worker_ttl_seconds: float = 30.0,
        max_queued: int = 100_000,
        max_queued_batch: int | None = None,
        advert_ttl_seconds: float = 3600.0,
    ):
        super().__init__(
            lease_seconds=lease_seconds,
            max_attempts=max_attempts,
            worker_ttl_seconds=worker_ttl_seconds,
            max_queued=max_queued,
            max_queued_batch=max_queued_batch,
            advert_ttl_seconds=advert_ttl_seconds,
        )
        kwargs: dict[str, Any] = {
            "socket_timeout": 10,
            "socket_connect_timeout": 5,
            "health_check_interval": 10,
            # A pooled connection that Redis closed (a restart) is reconnected and the
            # command sent again, twice at most, within about a second; then StoreUnavailable.
            "retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=2),
            "retry_on_error": [RedisConnectionError, RedisTimeoutError],
        }
        if password is not None:
            kwargs["password"] = password
        self.redis: aioredis.Redis = aioredis.from_url(url, **kwargs)
        # The reply reader blocks in XREAD: a client of its own, so that closing it ends the
        # read even where redis-py does not act on a task's cancellation.
        self._replies: aioredis.Redis = aioredis.from_url(url, **kwargs)
        self.replica = uuid.uuid4().hex[:12]
        self._reply_key = f"{PREFIX}reply:{self.replica}"
        self._futures: dict[str, asyncio.Future[ItemResult]] = {}
        #: Results read before submit() registered their futures (a busy event loop can see a
        #: fast worker's answer before the SUBMIT reply): item id -> (monotonic s, result).
        self._early: dict[str, tuple[float, ItemResult]] = {}
        #: Specs of the items this replica handed out (item id -> (monotonic s, the item)):
        #: a worker usually posts to the replica it pulled from, which then checks the results
        #: without reading the specs back from Redis.
        self._handed: dict[str, tuple[float, tuple[WorkItem, str]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        #: Requests waiting to be sent, per line (stream key), their entries encoded.
        self._submits: dict[str, list[_Submission]] = {}
        self._submitting: set[str] = set()  # lines with a SUBMIT call in flight
        self._submit_tasks: set[asyncio.Task[None]] = set()
        #: model -> (monotonic s, advert or None), at most :data:`ADVERTS_CACHED` models.
        self._adverts: OrderedDict[str, tuple[float, ModelAdvert | None]] = OrderedDict()
        #: The key lease ids are signed with (:meth:`_lease_id`), shared by the replicas.
        self._lease_key: bytes | None = None
        self._forgotten_at = 0.0  # monotonic s of the last pass over dead models' streams
        self._lease_ms = int(lease_seconds * 1000)
        self._submit = self.redis.register_script(_SUBMIT)
        self._pull = self.redis.register_script(_PULL)
        self._complete = self.redis.register_script(_COMPLETE)
        self._release = self.redis.register_script(_RELEASE)
        self._reap = self.redis.register_script(_REAP)
        self._forget = self.redis.register_script(_FORGET)
        self._save_batch = self.redis.register_script(_SAVE_BATCH)
        self._counts = self.redis.register_script(_COUNTS)
        self._unread = self.redis.register_script(_UNREAD)
        self._claim = self.redis.register_script(_CLAIM)
        self._cancel = self.redis.register_script(_CANCEL)
        self._reachable = True  # until a call fails (then logged once)
        self._closing = False

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self._beat()
            await self._index_batches()
        self._tasks = [
            asyncio.create_task(self._read_replies(), name="redis-replies"),
            asyncio.create_task(self._background(), name="redis-beat-reap"),
        ]

    async def close(self) -> None:
        self._closing = True
        for task in [*self._tasks, *self._submit_tasks]:
            task.cancel()
        await self._replies.aclose()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        with contextlib.suppress(RedisError, OSError):
            await self.redis.delete(f"{PREFIX}replica:{self.replica}", self._reply_key)
        await self.redis.aclose()

    def _closed(self) -> bool:
        """True once :meth:`close` began (a call, not the attribute: read after awaits)."""
        return self._closing

    async def ping(self) -> bool:
        try:
            await self._call(self.redis.ping())
        except StoreUnavailable:
            return False
        return True

    async def _call(self, op: Awaitable[T]) -> T:
        """Await a Redis call; connection trouble becomes :class:`StoreUnavailable`."""
        try:
            result = await op
        except (RedisConnectionError, RedisTimeoutError, OSError) as e:
            if self._reachable:  # logged once per outage, not per call
                log.warning("queue store unreachable (Redis: %s); retrying", e)
            self._reachable = False
            raise StoreUnavailable(f"Redis: {e}") from None
        if not self._reachable:
            log.warning("queue store reachable")
        self._reachable = True
        return result

    async def _beat(self) -> None:
        """The replica's heartbeat; the lease key agreed on (the first replica's; after Redis
        lost its data, whichever replica beats first sets it again for all)."""
        ttl = REPLICA_TTL_SECONDS
        async with self.redis.pipeline(transaction=False) as p:
            p.set(f"{PREFIX}replica:{self.replica}", "1", ex=ttl)
            p.expire(self._reply_key, ttl)
            p.set(LEASE_KEY, self._lease_key or secrets.token_bytes(32), nx=True)
            p.get(LEASE_KEY)
            *_, key = await self._call(p.execute())
        self._lease_key = key

    async def _leases(self) -> bytes:
        """The lease key (from Redis at the first call after a start without Redis)."""
        if self._lease_key is None:
            await self._beat()
        assert self._lease_key is not None
        return self._lease_key

    def _lease_id(self, item_id: str, attempt: int, worker_id: str) -> str:
        """The lease id of ``item_id``'s delivery ``attempt`` to ``worker_id``: the attempt and
        an HMAC-SHA256 of the three under the replicas' shared random key (128 bits shown).
        Unguessable without the key, and checked without a Redis read; whether the lease is
        still current is for the scripts to say (the entry's holder and attempt)."""
        assert self._lease_key is not None
        message = f"{item_id}\n{attempt}\n{worker_id}".encode()
        return f"{attempt}:{hmac.new(self._lease_key, message, hashlib.sha256).hexdigest()[:32]}"

    def _lease_attempt(self, item_id: str, lease_id: str, worker_id: str) -> int | None:
        """The attempt of a lease id this store issued for ``item_id`` to ``worker_id``; None
        for any other (forged, another worker's, an item id that names no queue entry)."""
        attempt = lease_id.partition(":")[0]
        if not (attempt.isdigit() and _ITEM_ID.match(item_id)):
            return None
        mine = self._lease_id(item_id, int(attempt), worker_id)
        return int(attempt) if hmac.compare_digest(mine, lease_id) else None

    async def _background(self) -> None:
        """Heartbeat and lease reaping, every :data:`HEARTBEAT_SECONDS` (reaping also at
        every pull), and the streams of models no worker serves dropped; survives Redis
        outages; ends once the store closes."""
        while not self._closing:
            await asyncio.sleep(min(HEARTBEAT_SECONDS, self.lease_seconds / 2))
            self._forget_handed()
            try:
                await self._beat()
                await self.reap()
                if time.monotonic() - self._forgotten_at >= min(FORGET_SECONDS, self.advert_ttl):
                    await self._forget_models()
            except StoreUnavailable:
                pass  # logged by _call, once per outage
            except RedisError as e:
                log.warning("queue store: %s", e)

    async def _forget_models(self) -> None:
        """Drop the empty streams of models whose adverts expired (the advert TTL): what
        workers advertise and then abandon costs nothing after that."""
        self._forgotten_at = time.monotonic()
        cursor, deleted = b"0", 0
        while True:
            cursor, n = await self._call(self._forget(args=[PREFIX, GROUP, cursor]))
            deleted += int(n)
            if cursor in (b"0", 0, "0"):
                break
        if deleted:
            log.info("dropped %d empty streams of models no worker serves", deleted)

    async def _read_replies(self) -> None:
        """Resolve this replica's waiting clients from its reply stream. Ends once the store
        closes, even where redis-py swallowed the task's cancellation mid-read (the loop would
        otherwise reconnect and read on: a session's event loop then never finished)."""
        last = "0"
        while not self._closing:
            try:
                got: Any = await self._call(
                    self._replies.xread({self._reply_key: last}, count=1000, block=1000)
                )
            except (StoreUnavailable, RedisError) as e:
                if self._closed():  # its client closed under it
                    return
                if not isinstance(e, StoreUnavailable):
                    log.warning("queue store (replies): %s", e)
                await asyncio.sleep(0.5)
                continue
            for _, entries in got or []:
                ids = []
                for entry_id, fields in entries:
                    ids.append(entry_id)
                    last = entry_id
                    result = ItemResult.model_validate_json(fields[b"r"])
                    self._resolve(fields[b"i"].decode(), result)
                self._forget_early()
                with contextlib.suppress(RedisError, OSError):
                    await self.redis.xdel(self._reply_key, *ids)

    def _resolve(self, item_id: str, result: ItemResult) -> None:
        """Answer a waiting client of this replica (or keep the answer for submit())."""
        if not self._answer_waiting(item_id, result):  # before submit() registered its futures
            _keep(self._early, item_id, result)

    def _answer_waiting(self, item_id: str, result: ItemResult) -> bool:
        """Answer the client of this replica whose future is registered for ``item_id`` (one
        that went away is left as it is); False if no future is registered for it."""
        future = self._futures.pop(item_id, None)
        if future is None:
            return False
        if not future.done():
            future.set_result(result)
        return True

    def _forget_early(self) -> None:
        """Drop early results nobody claimed within :data:`EARLY_RESULT_SECONDS`."""
        _forget_older(self._early, EARLY_RESULT_SECONDS)

    def _forget_handed(self) -> None:
        """Drop cached specs of items handed out more than two leases ago (their results, if
        any come, have the specs read from Redis)."""
        _forget_older(self._handed, 2 * self.lease_seconds)

    # --- client side --------------------------------------------------------------------
    async def submit(self, specs: list[ItemSpec]) -> Request:
        """Enqueue one request. Requests of one line (model, task, priority) that arrive while
        a SUBMIT of that line is in flight wait for it and then go in one call together (one
        round trip and one script run for many one-input requests); a request arriving at an
        idle line is sent at once. The request is encoded here, in its caller's task: what
        cannot be encoded (ValueError) fails this request alone, before any other joins it."""
        key = stream_key(specs[0].model, specs[0].task, specs[0].priority)
        waiter: asyncio.Future[Request] = asyncio.get_running_loop().create_future()
        submission = _Submission(uuid.uuid4().hex, specs, _entries(specs), waiter)
        self._submits.setdefault(key, []).append(submission)
        if key not in self._submitting:
            self._submitting.add(key)
            task = asyncio.create_task(self._send_submits(key), name="redis-submit")
            self._submit_tasks.add(task)
            task.add_done_callback(self._submit_tasks.discard)
        return await waiter

    async def _send_submits(self, key: str) -> None:
        """Send the line's waiting requests, :data:`INPUTS_PER_SUBMIT` inputs per SUBMIT call,
        until none wait; each waiter gets its request, :class:`QueueFull` or the error of its
        own call (:meth:`_submit_alone`). A request whose client went away meanwhile (its
        waiter cancelled) is cancelled again."""
        waiting: list[_Submission] = []
        try:
            while waiting := self._submits.pop(key, []):
                take, inputs = 0, 0
                while take < len(waiting) and (
                    take == 0 or inputs + len(waiting[take].specs) <= INPUTS_PER_SUBMIT
                ):
                    inputs += len(waiting[take].specs)
                    take += 1
                if take < len(waiting):  # the rest go first in the next call
                    self._submits[key] = waiting[take:] + self._submits.get(key, [])
                await self._submit_alone(key, waiting[:take])
        finally:  # cancelled (the store closing): no waiter is left waiting
            self._submitting.discard(key)
            for sub in waiting + self._submits.pop(key, []):
                sub.waiter.cancel()

    async def _submit_alone(self, key: str, batch: list[_Submission]) -> None:
        """:meth:`_submit_some`; if Redis refuses the call itself (a script error, not an
        outage), each request of it is sent again on its own, so that a request that breaks
        the script fails alone and never the requests coalesced with it."""
        try:
            await self._submit_some(key, batch)
        except StoreUnavailable as e:
            _fail(batch, e)
        except Exception as e:  # noqa: BLE001 - whatever it is, it is this call's alone
            if len(batch) == 1:
                log.warning("SUBMIT of one request failed: %s", e)
                _fail(batch, e)
                return
            for one in batch:
                await self._submit_alone(key, [one])

    async def _submit_some(self, key: str, batch: list[_Submission]) -> None:
        """One SUBMIT call for ``batch`` (requests of the line ``key``)."""
        first = batch[0].specs[0]
        model, task, limit = first.model, first.task, self.queue_limit(first.priority)
        args: list[Any] = [PREFIX, GROUP, limit, self.replica, model]
        for sub in batch:
            args += [sub.request_id, len(sub.specs), len(sub.entries)]
            for chunk in sub.entries:
                args += chunk
        keys = [key, _front(key), f"{PREFIX}streams"]
        rows = await self._call(self._submit(keys=keys, args=args))
        loop = asyncio.get_running_loop()
        for sub, (status, value) in zip(batch, rows, strict=True):
            if status == -1:
                if not sub.waiter.done():
                    sub.waiter.set_exception(QueueFull(model, int(value), limit))
                continue
            item_ids = [f"{sub.request_id}:{i}" for i in range(len(sub.specs))]
            futures = [loop.create_future() for _ in item_ids]
            self._futures.update(zip(item_ids, futures, strict=True))
            for item_id, future in zip(item_ids, futures, strict=True):
                early = self._early.pop(item_id, None)
                if early is not None:
                    self._futures.pop(item_id, None)
                    future.set_result(early[1])
            entries = [f"{entry.decode()}@{key}" for entry in value]
            request = _StreamRequest(model, task, item_ids, futures, sub.request_id, entries)
            if sub.waiter.done():  # the client went away while its request was being sent
                await self.cancel(request)
            else:
                sub.waiter.set_result(request)

    async def cancel(self, request: Request) -> None:
        unanswered = False
        for item_id, future in zip(request.item_ids, request.futures, strict=True):
            self._futures.pop(item_id, None)
            if not future.done():
                future.cancel()
                unanswered = True
        if not unanswered or not isinstance(request, _StreamRequest):
            return
        key = request.entries[0].partition("@")[2]
        entries = [e.partition("@")[0] for e in request.entries]
        try:
            await self._call(
                self._cancel(
                    keys=[_front(key), key], args=[PREFIX, GROUP, request.request_id, *entries]
                )
            )
        except (StoreUnavailable, RedisError) as e:  # the inputs are worked on for nobody
            log.warning("cancel: %s", e)

    async def any_taken(self, request: Request) -> bool:
        """True if a future is done, or an entry of the request was delivered or is gone
        (answered: its answer may still be on its way to this replica)."""
        if any(f.done() for f in request.futures):
            return True
        assert isinstance(request, _StreamRequest)
        async with self.redis.pipeline(transaction=False) as p:
            for at in request.entries:
                entry, _, key = at.partition("@")
                p.xpending_range(key, GROUP, min=entry, max=entry, count=1)
                p.xrange(key, min=entry, max=entry, count=1)
            found = await self._call(p.execute())
        for pending, present in zip(found[::2], found[1::2], strict=True):
            if not present or (pending and pending[0]["times_delivered"] > 0):
                return True
        return False

    def item_model(self, item_id: str) -> str | None:
        """From the item id (``<entry>/<input>@<stream key>``): the stream key names the model;
        None for an id that names no queue entry (:data:`_ITEM_ID`)."""
        if not _ITEM_ID.match(item_id):
            return None
        return _model_of(item_id.partition("@")[2])

    # --- worker side --------------------------------------------------------------------
    def _registration(self, adverts: list[ModelAdvert]) -> list[Any]:
        """The PULL script's registration arguments: the worker's adverts (TTL = the worker
        TTL) and each model's latest advert (TTL = the advert TTL)."""
        blob = json.dumps([a.model_dump(exclude_none=True) for a in adverts])
        out: list[Any] = [
            blob,
            max(1, int(self.worker_ttl * 1000)),
            max(1, int(self.advert_ttl * 1000)),
        ]
        for adv in adverts:
            out += [adv.name, adv.model_dump_json(exclude_none=True)]
        return out

    async def pull(
        self,
        worker_id: str,
        adverts: list[ModelAdvert],
        max_items: int,
        wait_seconds: float,
        max_tokens: int | None = None,
        max_batch_items: int | None = None,
    ) -> list[WorkItem]:
        keys = [stream_key(a.name, t) for a in adverts for t in a.tasks]
        deadline = time.monotonic() + wait_seconds
        batch_room = -1 if max_batch_items is None else max_batch_items
        await self._leases()
        while True:
            out = await self._take(worker_id, keys, max_items, max_tokens, adverts, batch_room)
            remaining = deadline - time.monotonic()
            if out or remaining <= 0:
                return out
            # Long poll: block until a new entry arrives in any of the streams (or a second
            # passes: expired leases are looked for again, the registration refreshed).
            block_ms = max(1, int(min(remaining, 1.0, self.worker_ttl / 3) * 1000))
            lines = [line for key in keys for line in (key, _batch_line(key))]
            if batch_room == 0:  # no batch work wanted: wait for interactive work only
                lines = keys
            streams: dict[Any, Any] = {k: ">" for line in lines for k in (_front(line), line)}
            got: Any = await self._call(
                self.redis.xreadgroup(GROUP, worker_id, streams, count=max_items, block=block_ms)
            )
            if got:
                # Handed out as they came: waiting for more requests on their way in left
                # the engine idle longer (docs/benchmarks.md).
                out = await self._hand_out(worker_id, got, max_items, max_tokens, batch_room)
                if out:
                    return out

    async def _hand_out(
        self, worker_id: str, got: Any, max_items: int, max_tokens: int | None, batch_room: int
    ) -> list[WorkItem]:
        """Entries a long poll's XREADGROUP just leased to this worker (first delivery),
        handed out at once while they fit whole in ``max_items``, the token budget and
        ``batch_room`` (-1: no limit); the others go back to the front with no attempt spent.
        Empty if the first does not fit (the next PULL script splits it)."""
        rows: list[tuple[str, int, str, bytes, int]] = []
        back: list[Any] = []
        tokens = 0
        for raw_key, entries in got:
            key = raw_key.decode()
            batch = key[len(PREFIX)] in "bc"
            for raw_id, raw in entries:
                entry_id = raw_id.decode()
                fields = {k.decode(): v for k, v in raw.items()}
                n, t = int(fields["n"]), int(fields["t"])
                over_budget = max_tokens is not None and tokens + t > max_tokens
                no_room = batch and 0 <= batch_room < n
                if back or len(rows) + n > max_items or (rows and over_budget) or no_room:
                    back += [key, entry_id]
                    continue
                if batch and batch_room > 0:
                    batch_room -= n
                tokens += t
                attempt = int(fields["a"]) + 1
                request_id = fields["q"].decode()
                lists = fields["k"], fields["x"], fields["s"]
                rows += [
                    (item_id, est, f"{request_id}:{x.decode()}", spec, attempt)
                    for item_id, est, x, spec in _inputs(key, entry_id, b"", *lists)
                ]
        if back:
            await self._call(self._unread(args=[PREFIX, GROUP, worker_id, self._lease_ms, *back]))
        return await self._work_items(worker_id, rows)

    async def _take(
        self,
        worker_id: str,
        keys: list[str],
        max_items: int,
        max_tokens: int | None,
        adverts: list[ModelAdvert],
        batch_room: int = -1,
    ) -> list[WorkItem]:
        """Register the worker and lease up to ``max_items`` (and ``max_tokens``, at least one
        input) across ``keys`` round-robin: each key a fair share per round,
        the result interleaved key by key. Per key, its batch line only with the room its
        interactive line leaves (the PULL script), ``batch_room`` batch inputs at most (-1: no
        limit)."""
        register = self._registration(adverts)
        if not keys:  # nothing to pull from: the registration alone
            await self._call(
                self.redis.set(f"{PREFIX}worker:{worker_id}", register[0], px=register[1])
            )
            return []
        budget = max_tokens if max_tokens is not None else -1
        taken: dict[str, list[WorkItem]] = {k: [] for k in keys}
        remaining = max_items
        active = list(keys)
        while remaining > 0 and active and budget != 0:
            share = max(1, remaining // len(active))
            for key in list(active):
                if remaining <= 0 or budget == 0:
                    break
                n = min(share, remaining)
                got = await self._take_from(worker_id, key, n, budget, batch_room, register)
                register = [""]  # registered by the first call
                if batch_room > 0:
                    batch_room = max(0, batch_room - sum(1 for i in got if i.priority))
                taken[key] += got
                remaining -= len(got)
                if budget >= 0:
                    budget = max(0, budget - sum(i.est_tokens for i in got))
                if len(got) < share:
                    active.remove(key)  # drained (or out of room for its next entry)
        out: list[WorkItem] = []
        for turn in range(max((len(v) for v in taken.values()), default=0)):
            out += [v[turn] for v in taken.values() if turn < len(v)]
        return out

    async def _take_from(
        self,
        worker_id: str,
        key: str,
        n: int,
        budget: int,
        batch_room: int,
        register: list[Any],
    ) -> list[WorkItem]:
        """One PULL script call on one model and task's streams; ``budget`` and
        ``batch_room`` -1 for none; ``register``: see :meth:`_registration` (``[""]``: none)."""
        args: list[Any] = [PREFIX, GROUP, worker_id, self._lease_ms, n, budget, self.max_attempts]
        args.append(batch_room)
        batch = _batch_line(key)
        keys = [_front(key), key, _front(batch), batch]
        *taken, dead, expired, _dropped = await self._call(
            self._pull(keys=keys, args=args + register)
        )
        model = _model_of(key)
        if dead:
            metrics.DEAD_LETTERS.labels(model).inc(dead)
        if expired:
            metrics.LEASES_EXPIRED.labels(model).inc(expired)
        rows: list[tuple[str, int, str, bytes, int]] = []
        for stream, entry_id, attempt, ks, tokens, indices, specs, request_id in taken:
            request = request_id.decode()
            inputs = _inputs(stream.decode(), entry_id.decode(), ks, tokens, indices, specs)
            rows += [
                (item_id, est, f"{request}:{x.decode()}", spec, int(attempt))
                for item_id, est, x, spec in inputs
            ]
        return await self._work_items(worker_id, rows)

    async def _work_items(
        self, worker_id: str, rows: list[tuple[str, int, str, bytes, int]]
    ) -> list[WorkItem]:
        """Leased inputs as the worker sees them, from rows (item id, estimated tokens, the id
        its client waits on, spec JSON, attempt); counts their queue wait or redelivery. An
        input whose spec cannot be read is not handed out but answered alone with
        ``invalid_input``."""
        out: list[WorkItem] = []
        broken: list[ItemResult] = []
        for item_id, tokens, client, spec, attempt in rows:
            entry_id, _, key = item_id.partition("@")
            model = _model_of(key)
            if attempt == 1:
                waited_ms = time.time() * 1000 - int(entry_id.partition("-")[0])
                metrics.QUEUE_WAIT.labels(model).observe(max(0.0, waited_ms) / 1000)
            else:
                metrics.REDELIVERIES.labels(model).inc()
            lease_id = self._lease_id(item_id, attempt, worker_id)
            try:
                item = WorkItem(
                    item_id=item_id,
                    lease_id=lease_id,
                    lease_seconds=self.lease_seconds,
                    attempt=attempt,
                    est_tokens=tokens,
                    **json.loads(spec),
                )
            except ValueError as e:
                error = ItemError(code=ErrorCode.INVALID_INPUT, message=f"unreadable input: {e}")
                broken.append(ItemResult(item_id=item_id, lease_id=lease_id, error=error))
                continue
            _keep(self._handed, item_id, (item, client))
            out.append(item)
        if broken:
            await self.complete(worker_id, broken)
        return out

    async def complete(self, worker_id: str, results: list[ItemResult]) -> Completion:
        done = Completion()
        await self._leases()
        mine: list[tuple[ItemResult, int]] = []  # results with a lease id issued to this worker
        for res in results:
            attempt = self._lease_attempt(res.item_id, res.lease_id, worker_id)
            if attempt is None:
                done.ignored += 1  # forged, another worker's, or no queue entry at all
            else:
                mine.append((res, attempt))
        if not mine:
            return done
        specs = await self._specs([r.item_id for r, _ in mine])
        models = {_model_of(r.item_id.partition("@")[2]) for r, _ in mine}
        adverts = {m: await self.advert(m) for m in models}
        args: list[Any] = [PREFIX, GROUP, worker_id, self.max_attempts, self._lease_ms]
        args.append(self.replica)
        checked_all: list[ItemResult] = []
        clients: list[str] = []  # per result: its client's id where this replica holds it
        answered: set[str] = set()  # item ids whose client was answered before the call
        now = time.monotonic()
        for res, attempt in mine:
            spec = specs.get(res.item_id)
            model = _model_of(res.item_id.partition("@")[2])
            checked = check_result(res, spec, prompt_token_limit(spec, adverts[model]))
            checked_all.append(checked)
            handed = self._handed.get(res.item_id)
            client, current = None, False
            if handed is not None:
                handed_at, (item, client) = handed
                # the lease this replica handed out and that cannot have expired yet
                current = item.lease_id == res.lease_id and now - handed_at < self.lease_seconds
            # A client of this replica is answered here: its result need not go to Redis.
            local = client is not None and client in self._futures
            clients.append(client if local and client else "")
            if checked.error is not None and checked.error.retryable:
                kind, payload = "retry", checked.error.message  # for the dead letter
            else:
                kind = "ok" if checked.error is None else "final"
                payload = "" if local else checked.model_dump_json(exclude_none=True)
            # A valid vector from the current lease: the client has it before the COMPLETE
            # round trip.
            if kind == "ok" and local and current and self._answer_waiting(client or "", checked):
                answered.add(res.item_id)
            args += [res.item_id, f"{kind}{attempt}", payload]
        statuses = await self._call(self._complete(args=args))
        for (res, _), checked, raw, client in zip(
            mine, checked_all, statuses, clients, strict=True
        ):
            status = raw.decode()
            if status == "i":  # no longer its lease (expired, released) or already answered
                done.ignored += 1
                continue
            self._handed.pop(res.item_id, None)
            # A rejected result counts as a failed attempt of its item, not as accepted.
            if checked is not res:
                done.rejected += 1
                metrics.RESULTS_REJECTED.labels(_model_of(res.item_id.partition("@")[2])).inc()
            else:
                done.accepted += 1
            if status.startswith("l") and res.item_id not in answered:
                self._resolve(status[1:] or client, checked)
            elif status == "d":
                metrics.DEAD_LETTERS.labels(_model_of(res.item_id.partition("@")[2])).inc()
        return done

    async def _specs(self, item_ids: list[str]) -> dict[str, ItemSpec]:
        """The specs of the items (to check their results against): this replica's cache of
        what it handed out, else read from the still-queued entries."""
        out: dict[str, ItemSpec] = {}
        missing: list[tuple[str, str, str, str]] = []  # item id, stream, entry, input
        for item_id in item_ids:
            cached = self._handed.get(item_id)
            if cached is not None:
                out[item_id] = cached[1][0]
                continue
            at, _, key = item_id.partition("@")
            entry, _, k = at.partition("/")
            if _ITEM_ID.match(item_id):
                missing.append((item_id, key, entry, k))
        if not missing:
            return out
        async with self.redis.pipeline(transaction=False) as p:
            for _, key, entry, _ in missing:
                p.xrange(key, min=entry, max=entry, count=1)
            rows = await self._call(p.execute())
        for (item_id, _, _, k), found in zip(missing, rows, strict=True):
            specs = found[0][1].get(b"s", b"").split(b"\n") if found else []
            if 1 <= int(k) <= len(specs):
                out[item_id] = ItemSpec.model_validate_json(specs[int(k) - 1])
        return out

    async def release(
        self, worker_id: str, leases: list[tuple[str, str]], count_attempt: bool = False
    ) -> int:
        await self._leases()
        args: list[Any] = [PREFIX, GROUP, worker_id, self._lease_ms, int(count_attempt)]
        for item_id, lease_id in leases:
            attempt = self._lease_attempt(item_id, lease_id, worker_id)
            if attempt is not None:
                args += [item_id, attempt]
        if len(args) == 5:
            return 0
        return int(await self._call(self._release(args=args)))

    async def reap(self) -> None:
        flat = await self._call(self._reap(args=[PREFIX, GROUP, self._lease_ms, self.max_attempts]))
        for i in range(0, len(flat), 3):
            model, expired, dead = _model_of(flat[i].decode()), int(flat[i + 1]), int(flat[i + 2])
            if expired:
                metrics.LEASES_EXPIRED.labels(model).inc(expired)
            if dead:
                metrics.DEAD_LETTERS.labels(model).inc(dead)

    # --- batch jobs ---------------------------------------------------------------------
    def _batch_keys(self, owner: str) -> list[str]:
        """The batch records, the owner's index, the running batches (all, the owner's), the
        ended ones and the owners: ``_SAVE_BATCH``'s KEYS."""
        return [
            BATCHES,
            f"{BATCHES}:by-owner:{owner}",
            f"{BATCHES}:running",
            f"{BATCHES}:running:{owner}",
            f"{BATCHES}:ended",
            f"{BATCHES}:owners",
        ]

    async def save_batch(self, batch_id: str, record: str, index: BatchIndex) -> None:
        ended = "" if index.ended_at is None else index.ended_at
        args: list[Any] = [batch_id, record, index.created_at, ended, index.owner]
        await self._call(self._save_batch(keys=self._batch_keys(index.owner), args=args))

    async def _index_batches(self) -> None:
        """Index the records a gateway from before the indexes kept (once per Redis)."""
        from gateway.batch.models import BatchRecord

        if await self._call(self.redis.exists(f"{BATCHES}:indexed")):
            return
        async for batch_id, raw in self.redis.hscan_iter(BATCHES):
            record = BatchRecord.model_validate_json(raw)
            await self.save_batch(batch_id.decode(), raw.decode(), record.index())
        await self._call(self.redis.set(f"{BATCHES}:indexed", 1))

    async def load_batch(self, batch_id: str) -> str | None:
        raw: Any = await self._call(self.redis.hget(BATCHES, batch_id))
        return raw.decode() if raw is not None else None

    async def running_batches(self, owner: str | None = None) -> list[str]:
        key = f"{BATCHES}:running" + (f":{owner}" if owner is not None else "")
        ids: Any = await self._call(self.redis.smembers(key))
        return [i.decode() for i in ids]

    async def owner_batches(
        self, owner: str, after: str | None, limit: int
    ) -> tuple[list[str], bool]:
        index = f"{BATCHES}:by-owner:{owner}"
        start = 0
        if after is not None:
            rank = await self._call(self.redis.zrevrank(index, after))
            if rank is None:
                return [], False
            start = int(rank) + 1  # type: ignore[arg-type]
        ids: Any = await self._call(self.redis.zrevrange(index, start, start + limit))
        page = ids[:limit]
        records: Any = await self._call(self.redis.hmget(BATCHES, page)) if page else []
        return [r.decode() for r in records if r is not None], len(ids) > limit

    async def trim_batches(self, owner: str, keep: int) -> list[str]:
        index = f"{BATCHES}:by-owner:{owner}"
        over = int(await self._call(self.redis.zcard(index))) - keep
        if over <= 0:
            return []
        # the oldest first; running ones (at most --max-batches-per-key) are passed over
        oldest: Any = await self._call(self.redis.zrange(index, 0, over + 64))
        async with self.redis.pipeline(transaction=False) as p:
            for batch_id in oldest:
                p.zscore(f"{BATCHES}:ended", batch_id)
            ended = await self._call(p.execute())
        gone = [i.decode() for i, at in zip(oldest, ended, strict=True) if at is not None]
        return await self._drop_batches(gone[:over])

    async def expire_batches(self, ended_before: float) -> list[str]:
        ids: Any = await self._call(
            self.redis.zrangebyscore(f"{BATCHES}:ended", "-inf", f"({ended_before}", 0, 100)
        )
        return await self._drop_batches([i.decode() for i in ids])

    async def _drop_batches(self, batch_ids: list[str]) -> list[str]:
        """Forget the batches: records, indexes, cancels, runner claims. Their records."""
        if not batch_ids:
            return []
        raws: Any = await self._call(self.redis.hmget(BATCHES, batch_ids))
        owners: Any = await self._call(self.redis.hmget(f"{BATCHES}:owners", batch_ids))
        async with self.redis.pipeline(transaction=True) as p:
            for batch_id, owner in zip(batch_ids, owners, strict=True):
                if owner is not None:
                    p.zrem(f"{BATCHES}:by-owner:{owner.decode()}", batch_id)
                    p.srem(f"{BATCHES}:running:{owner.decode()}", batch_id)
                p.hdel(BATCHES, batch_id)
                p.hdel(f"{BATCHES}:owners", batch_id)
                p.srem(f"{BATCHES}:running", batch_id)
                p.zrem(f"{BATCHES}:ended", batch_id)
                p.hdel(f"{PREFIX}batch-cancels", batch_id)
                p.delete(f"{PREFIX}batch-runner:{batch_id}")
            await self._call(p.execute())
        return [raw.decode() for raw in raws if raw is not None]

    async def claim_batch(self, batch_id: str, runner: str, seconds: float) -> bool:
        key, ms = f"{PREFIX}batch-runner:{batch_id}", max(1, int(seconds * 1000))
        return bool(await self._call(self._claim(keys=[key], args=[runner, ms])))

    async def cancel_batch(self, batch_id: str) -> int:
        key = f"{PREFIX}batch-cancels"
        await self._call(self.redis.hsetnx(key, batch_id, int(time.time())))
        return int(await self._call(self.redis.hget(key, batch_id)))  # type: ignore[arg-type]

    async def batch_cancelled(self, batch_id: str) -> int | None:
        raw: Any = await self._call(self.redis.hget(f"{PREFIX}batch-cancels", batch_id))
        return int(raw) if raw is not None else None

    # --- views --------------------------------------------------------------------------
    async def _queue_counts(self) -> list[tuple[str, int, int]]:
        """(model, waiting, leased) inputs."""
        flat = await self._call(self._counts(args=[PREFIX, GROUP]))
        out = []
        for i in range(0, len(flat), 3):
            unanswered, leased = int(flat[i + 1]), int(flat[i + 2])
            out.append((flat[i].decode(), max(0, unanswered - leased), leased))
        return out

    async def depth(self) -> dict[str, int]:
        return {model: waiting for model, waiting, _ in await self._queue_counts() if waiting}

    async def leased(self) -> dict[str, int]:
        return {model: leased for model, _, leased in await self._queue_counts() if leased}

    async def _workers(self) -> AsyncIterator[list[ModelAdvert]]:
        keys = [k async for k in self.redis.scan_iter(match=f"{PREFIX}worker:*", count=500)]
        if not keys:
            return
        for blob in await self._call(self.redis.mget(keys)):
            if blob is not None:
                yield [ModelAdvert.model_validate(a) for a in json.loads(blob)]

    async def available_models(self) -> dict[str, tuple[ModelAdvert, int]]:
        out: dict[str, tuple[ModelAdvert, int]] = {}
        try:
            async for adverts in self._workers():
                for adv in adverts:
                    count_advert(out, adv)
        except (RedisConnectionError, RedisTimeoutError, OSError) as e:
            raise StoreUnavailable(f"Redis: {e}") from None
        return out

    async def advert(self, model: str) -> ModelAdvert | None:
        """The model's latest advert (cached for a second: every client request asks; at most
        :data:`ADVERTS_CACHED` models, the oldest looked up dropped first: clients choose the
        names)."""
        at, cached = self._adverts.get(model, (0.0, None))
        if time.monotonic() - at < 1.0:
            return cached
        blob = await self._call(self.redis.get(f"{PREFIX}advert:{model}"))
        advert = ModelAdvert.model_validate_json(blob) if blob is not None else None
        self._adverts.pop(model, None)
        self._adverts[model] = (time.monotonic(), advert)
        while len(self._adverts) > ADVERTS_CACHED:
            self._adverts.popitem(last=False)
        return advert
