"""``redis://[user:password@]host:port/db`` (and ``rediss://``): queues, results and events in Redis.

Every key lives under ``offload:<namespace>:``::

    m:<id>        hash: q (queue), b (body), s (ready score), d (deliveries), k (dedup key)
    q:<queue>     sorted set of ready ids, scored (9 - priority) * 1e12 + sequence
    queues        set of queue names ever used (for stats)
    seq           arrival counter, for FIFO order within a priority
    sched         sorted set of ids waiting for their eta, scored by eta
    lease         sorted set of leased ids, scored by lease deadline
    key:<key>     dedup key -> id of the message holding it
    dead          sorted set of dead-letter ids, scored by time of death
    x:<id>        hash of a dead letter: q, b, r (reason), t (time)
    claim:<token> a fetch's result for a few seconds, so a retried fetch gets the same leases
    waiters:<q>   sorted set of fetch calls blocked on a queue, scored by when they stop waiting
    waiting:<w>   what an enqueue needs to hand a blocked fetch messages: lease, channel, queues, how many
    state:<id>    a task's encoded state (Store)
    kv:<key>      the Store's key-value space
    wake:<queue>  pub/sub channel: the queue got ready messages while a fetch was waiting on it
    hand:<uuid>   pub/sub channel of one broker object: messages handed to its blocked fetches
    done:<id>     list holding a task's final state for two minutes, for blocked sync waiters
    task:<id>     pub/sub channel: the state of that task changed (a final state comes with it)
    chan:<name>   pub/sub channel of `Store.publish`

A message is in exactly one of ``q:<queue>``, ``sched`` and ``lease`` at a time, and every move
between them happens inside one Lua script, so claiming and leasing are one atomic step and a
delayed message never sits inside a lease. Scripts read the server's clock (``TIME``) so that
lease deadlines do not depend on the clocks of the machines running workers.

Every operation is one round trip. Commands reconnect with exponential backoff, and every script
is safe to run twice (a fetch retried after its reply was lost hands out the same leases again),
so a connection dropped mid-call loses nothing.

A fetch that finds nothing registers itself in ``waiters:<queue>`` within the same script, and
sleeps until a message is handed to it, a message on ``wake:<queue>``, the time the next
scheduled message or lease is due, or its timeout. An enqueue that finds a fetch waiting on its
queue leases the message to it at once and publishes it on that fetch's ``hand:`` channel, so
an idle worker starts the task without a claim of its own; a handed message that its fetch no
longer waits for is served by the next fetch of the same broker object, or put back at close.
Producers publish only while someone waits, so a busy system carries no pub/sub traffic per task. Pub/sub (wake-ups, task watches, channels) shares one connection
per broker or store object; when it drops it is rebuilt, resubscribed, and every waiter is woken
once to re-read what it waits on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import Connection, SSLConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    AuthorizationError,
    NoPermissionError,
    NoScriptError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from offload.brokers.base import Broker, DeadLetter, Delivery, Direct, OutgoingMessage, QueueStats, Store, Watch, ttl_ms
from offload.config import BrokerURL
from offload.errors import BrokerError, BrokerUnavailable, ConfigError
from offload.retrying import Backoff, retry_within

log = logging.getLogger("offload.brokers.redis")
_T = TypeVar("_T")

# connect(): give up after this long, so an unreachable server is an error, never a hang.
_CONNECT_BUDGET_S = 3.0
# Commands: a dropped connection is retried with backoff 0.1, 0.2, 0.4, 0.8, then 1 s (about
# 5.5 s in all) before the caller sees BrokerUnavailable; enough to ride out a server restart
# or a failover without hiding a real outage for long.
_RETRIES = 8
# No operation waits longer than this for the server, retries included. It replaces redis-py's
# socket_timeout, which wraps every write in a new task and costs about a quarter of a command's time.
_OPERATION_TIMEOUT_S = 30.0
# A peer that vanished without closing the connection is noticed by the kernel: unacknowledged
# writes give up after TCP_USER_TIMEOUT, idle connections are probed by keepalives.
_KEEPALIVE = {
    name: value
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3), ("TCP_USER_TIMEOUT", 15000))
    if hasattr(socket, name)
}
# The pub/sub connection is idle most of the time; ping it after this much silence and
# rebuild it when the ping goes unanswered, so a half-open connection is noticed.
_PUBSUB_IDLE_S = 10.0
_UNSUBSCRIBE_AFTER_S = 0.5
_PURGE_CHUNK = 1000
# A fetch relies on its standing registration only until this long before the server forgets it.
_REGISTRATION_MARGIN_S = 0.25
# How long a final state stays in done:<id> for blocked sync waiters (see Direct.wait_final).
DONE_SIGNAL_MS = 120_000
_MAX_CONNECTIONS = 64

# --- Lua -------------------------------------------------------------------------------------
# KEYS[1] is always the namespace prefix. Scores and times are formatted explicitly because
# Lua turns numbers into strings with only 14 significant digits.

_LUA_COMMON = r"""
local P = KEYS[1]
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function fmt(x) return string.format('%.6f', x) end
local function release_key(id, key)
  if key then
    local kk = P .. 'key:' .. key
    if redis.call('GET', kk) == id then redis.call('DEL', kk) end
  end
end
-- Forget a message that is no longer in any of q:<queue>, sched, lease.
local function drop(id)
  local mk = P .. 'm:' .. id
  release_key(id, redis.call('HGET', mk, 'k'))
  redis.call('DEL', mk)
end
-- Tell fetches blocked on the queue that it has ready messages; nobody listens otherwise.
local function wake(q, t)
  if redis.call('ZCOUNT', P .. 'waiters:' .. q, fmt(t), '+inf') > 0 then
    redis.call('PUBLISH', P .. 'wake:' .. q, '')
  end
end
-- Hand a ready message straight to a fetch blocked on its queue: lease it in that fetch's name
-- and publish it on the fetch's own channel, which saves the waiting worker the round trip of
-- a claim. False (nothing changed) when nobody waits or the waiter's connection is gone.
local function hand(id, q, t)
  local wk = P .. 'waiters:' .. q
  local w = redis.call('ZRANGEBYSCORE', wk, fmt(t), '+inf', 'LIMIT', 0, 1)[1]
  if not w then return false end
  local info = redis.call('GET', P .. 'waiting:' .. w)
  if not info then return false end
  info = cjson.decode(info)
  local mk = P .. 'm:' .. id
  local d = redis.call('HINCRBY', mk, 'd', 1)
  local body = redis.call('HGET', mk, 'b')
  local head = table.concat({#w, #id, #q, d}, ' ')
  if redis.call('PUBLISH', info[2], head .. '\n' .. w .. id .. q .. body) == 0 then
    redis.call('HINCRBY', mk, 'd', -1)
    return false
  end
  redis.call('ZADD', P .. 'lease', fmt(t + info[1]), id)
  -- As many messages as the fetch asked for; then it must claim (and register) again.
  info[4] = info[4] - 1
  if info[4] > 0 then
    redis.call('SET', P .. 'waiting:' .. w, cjson.encode(info), 'KEEPTTL')
  else
    for _, wq in ipairs(info[3]) do redis.call('ZREM', P .. 'waiters:' .. wq, w) end
    redis.call('DEL', P .. 'waiting:' .. w)
  end
  return true
end
-- Move due scheduled messages and expired leases into their ready queues (a bounded batch per
-- call; the rest follow on the next call), and wake the consumers of those queues.
local function surface(t)
  local woke = {}
  for _, src in ipairs({'sched', 'lease'}) do
    local zk = P .. src
    local ids = redis.call('ZRANGEBYSCORE', zk, '-inf', fmt(t), 'LIMIT', 0, 500)
    for _, id in ipairs(ids) do
      redis.call('ZREM', zk, id)
      local v = redis.call('HMGET', P .. 'm:' .. id, 'q', 's')
      if v[1] then
        redis.call('ZADD', P .. 'q:' .. v[1], v[2], id)
        woke[v[1]] = true
      end
    end
  end
  for q in pairs(woke) do wake(q, t) end
end
"""

# ARGV: id, queue, body, priority, eta ('' = now), has_key ('1'/'0'), key, first state ('' = none),
# its time to live in ms (0 = none)
_LUA_ENQUEUE = r"""
local id, q = ARGV[1], ARGV[2]
local mk = P .. 'm:' .. id
-- Enqueueing an id twice (a producer retrying) stores it once.
if redis.call('EXISTS', mk) == 1 then return id end
local key = false
if ARGV[6] == '1' then
  key = ARGV[7]
  local holder = redis.call('GET', P .. 'key:' .. key)
  if holder and redis.call('EXISTS', P .. 'm:' .. holder) == 1 then return holder end
  redis.call('SET', P .. 'key:' .. key, id)
end
if ARGV[8] ~= '' then
  -- The task's first state, stored before the message can be claimed.
  redis.call('DEL', P .. 'done:' .. id)
  local ttl = tonumber(ARGV[9])
  if ttl > 0 then
    redis.call('SET', P .. 'state:' .. id, ARGV[8], 'PX', ttl)
  else
    redis.call('SET', P .. 'state:' .. id, ARGV[8])
  end
end
local score = string.format('%.0f', (9 - tonumber(ARGV[4])) * 1e12 + redis.call('INCR', P .. 'seq'))
redis.call('HSET', mk, 'q', q, 'b', ARGV[3], 's', score, 'd', '0')
if key then redis.call('HSET', mk, 'k', key) end
redis.call('SADD', P .. 'queues', q)
local eta = tonumber(ARGV[5])
local t = now()
if eta and eta > t then
  redis.call('ZADD', P .. 'sched', fmt(eta), id)
elseif not hand(id, q, t) then
  redis.call('ZADD', P .. 'q:' .. q, score, id)
  wake(q, t)
end
return id
"""

# ARGV: token, lease_s, limit, waiter id, wait_s (how long the caller will wait if nothing is
# ready; 0 = not at all), the caller's hand-off channel ('' = none), queue...
# Returns {'1', id, queue, body, deliveries, ...} or {'0', seconds until something may become
# ready ('' when nothing is scheduled or leased)}.
_LUA_CLAIM_FN = r"""
local function claim(token, lease, limit, waiter, wait_s, hand_channel, queues)
  local memo_key = P .. 'claim:' .. token
  local out = {'1'}
  local memo = redis.call('GET', memo_key)
  if memo then
    -- The same call again: its reply was lost on a dropped connection. Hand out the same leases
    -- rather than leaving them stranded until they run out.
    for _, e in ipairs(cjson.decode(memo)) do
      local v = redis.call('HMGET', P .. 'm:' .. e[1], 'q', 'b', 'd')
      if v[1] and v[3] == e[2] and redis.call('ZSCORE', P .. 'lease', e[1]) then
        out[#out + 1] = e[1]; out[#out + 1] = v[1]; out[#out + 1] = v[2]; out[#out + 1] = v[3]
      end
    end
    return out
  end
  local t = now()
  surface(t)
  local picked = {}
  local nq = #queues
  if nq == 1 then
    local r = redis.call('ZPOPMIN', P .. 'q:' .. queues[1], limit)
    for i = 1, #r, 2 do picked[#picked + 1] = r[i] end
  else
    -- Merge the heads of the queues: priority first, then the order the queues were given in,
    -- then arrival.
    local cands = {}
    for qi = 1, nq do
      local q = queues[qi]
      local r = redis.call('ZRANGE', P .. 'q:' .. q, 0, limit - 1, 'WITHSCORES')
      for i = 1, #r, 2 do
        local s = tonumber(r[i + 1])
        cands[#cands + 1] = {math.floor(s / 1e12), qi, s, r[i], q}
      end
    end
    table.sort(cands, function(a, b)
      if a[1] ~= b[1] then return a[1] < b[1] end
      if a[2] ~= b[2] then return a[2] < b[2] end
      return a[3] < b[3]
    end)
    for i = 1, math.min(limit, #cands) do
      redis.call('ZREM', P .. 'q:' .. cands[i][5], cands[i][4])
      picked[#picked + 1] = cands[i][4]
    end
  end
  local deadline = fmt(t + lease)
  local leased = {}
  for _, id in ipairs(picked) do
    local mk = P .. 'm:' .. id
    local v = redis.call('HMGET', mk, 'q', 'b')
    if v[1] then
      local d = tostring(redis.call('HINCRBY', mk, 'd', 1))
      redis.call('ZADD', P .. 'lease', deadline, id)
      out[#out + 1] = id; out[#out + 1] = v[1]; out[#out + 1] = v[2]; out[#out + 1] = d
      leased[#leased + 1] = {id, d}
    end
  end
  if #leased > 0 then
    -- Kept while a retry can still come (the caller's operation timeout) and the leases last.
    local memo_ms = math.max(1, math.floor(math.min(lease, 35) * 1000))
    redis.call('SET', memo_key, cjson.encode(leased), 'PX', memo_ms)
    for _, q in ipairs(queues) do redis.call('ZREM', P .. 'waiters:' .. q, waiter) end
    redis.call('DEL', P .. 'waiting:' .. waiter)
    return out
  end
  if wait_s > 0 then
    -- Registered in the same step that found the queues empty, so no enqueue can slip between.
    -- The second of slack covers a caller that wakes a little after its own deadline.
    for _, q in ipairs(queues) do
      local wk = P .. 'waiters:' .. q
      redis.call('ZREMRANGEBYSCORE', wk, '-inf', fmt(t))
      redis.call('ZADD', wk, fmt(t + wait_s + 1), waiter)
    end
    if hand_channel ~= '' then
      -- What an enqueue needs to hand this fetch a message (see hand()).
      redis.call('SET', P .. 'waiting:' .. waiter, cjson.encode({lease, hand_channel, queues, limit}),
        'PX', math.floor((wait_s + 1) * 1000))
    end
  end
  local next_at = nil
  for _, src in ipairs({'sched', 'lease'}) do
    local r = redis.call('ZRANGE', P .. src, 0, 0, 'WITHSCORES')
    if r[2] then
      local s = tonumber(r[2])
      if next_at == nil or s < next_at then next_at = s end
    end
  end
  if next_at == nil then return {'0', ''} end
  return {'0', fmt(math.max(0, next_at - t))}
end
"""
_LUA_CLAIM = (
    "return claim(ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5]), ARGV[6], "
    "{unpack(ARGV, 7)})"
)

# ARGV: id...
_LUA_ACK = "return ack(1, #ARGV)"

# ARGV: lease_s, then (id, receipt) pairs; an empty receipt skips the holder check.
_LUA_EXTEND = r"""
local deadline = fmt(now() + tonumber(ARGV[1]))
for i = 2, #ARGV, 2 do
  local id, tok = ARGV[i], ARGV[i + 1]
  local v = redis.call('HMGET', P .. 'm:' .. id, 'q', 'd')
  if v[1] and (tok == '' or v[2] == tok) then
    if redis.call('ZSCORE', P .. 'lease', id) then
      redis.call('ZADD', P .. 'lease', deadline, id)
    elseif redis.call('ZREM', P .. 'q:' .. v[1], id) == 1 then
      -- The heartbeat came late: the lease ran out and the message went back to its queue, but
      -- nobody has taken it since (same delivery count). The worker still runs it; keep it.
      redis.call('ZADD', P .. 'lease', deadline, id)
    end
  end
end
return 1
"""

# ARGV: id, receipt, has_body, body, delay_s
_LUA_REQUEUE = r"""
local id, tok = ARGV[1], ARGV[2]
local mk = P .. 'm:' .. id
local v = redis.call('HMGET', mk, 'q', 's', 'd')
-- Only the current holder may requeue: a worker whose lease ran out and was handed to another
-- must not pull the message from under it.
if not v[1] or (tok ~= '' and v[3] ~= tok) then return 0 end
if ARGV[3] == '1' then redis.call('HSET', mk, 'b', ARGV[4]) end
redis.call('ZREM', P .. 'lease', id)
redis.call('ZREM', P .. 'q:' .. v[1], id)
redis.call('ZREM', P .. 'sched', id)
local delay = tonumber(ARGV[5])
local t = now()
if delay > 0 then
  redis.call('ZADD', P .. 'sched', fmt(t + delay), id)
else
  redis.call('ZADD', P .. 'q:' .. v[1], v[2], id)
  wake(v[1], t)
end
return 1
"""

# ARGV: id, queue, body, reason
_LUA_DEAD = r"""
local id = ARGV[1]
local q = redis.call('HGET', P .. 'm:' .. id, 'q')
if redis.call('ZREM', P .. 'lease', id) == 0 and q then
  redis.call('ZREM', P .. 'q:' .. q, id)
  redis.call('ZREM', P .. 'sched', id)
end
drop(id)
local t = fmt(now())
redis.call('HSET', P .. 'x:' .. id, 'q', ARGV[2], 'b', ARGV[3], 'r', ARGV[4], 't', t)
redis.call('ZADD', P .. 'dead', t, id)
return 1
"""

# ARGV: limit. Returns id, queue, body, reason, time per dead letter, newest first.
_LUA_DEAD_LIST = r"""
local out = {}
for _, id in ipairs(redis.call('ZREVRANGE', P .. 'dead', 0, tonumber(ARGV[1]) - 1)) do
  local v = redis.call('HMGET', P .. 'x:' .. id, 'q', 'b', 'r', 't')
  if v[1] then
    out[#out + 1] = id; out[#out + 1] = v[1]; out[#out + 1] = v[2]; out[#out + 1] = v[3]; out[#out + 1] = v[4]
  end
end
return out
"""

# ARGV: all ('1'/'0'), id... Same reply shape as _LUA_DEAD_LIST, oldest first.
_LUA_REPLAY = r"""
local ids
if ARGV[1] == '1' then
  ids = redis.call('ZRANGE', P .. 'dead', 0, -1)
else
  ids = {}
  for i = 2, #ARGV do ids[#ids + 1] = ARGV[i] end
end
local out = {}
for _, id in ipairs(ids) do
  local xk = P .. 'x:' .. id
  local v = redis.call('HMGET', xk, 'q', 'b', 'r', 't')
  if v[1] then
    out[#out + 1] = id; out[#out + 1] = v[1]; out[#out + 1] = v[2]; out[#out + 1] = v[3]; out[#out + 1] = v[4]
    redis.call('DEL', xk)
    redis.call('ZREM', P .. 'dead', id)
  end
end
return out
"""

# ARGV: id
_LUA_CANCEL = r"""
local id = ARGV[1]
local q = redis.call('HGET', P .. 'm:' .. id, 'q')
if not q then return 0 end
-- A leased message is in neither set: it is running and cannot be cancelled here.
if redis.call('ZREM', P .. 'q:' .. q, id) + redis.call('ZREM', P .. 'sched', id) == 0 then return 0 end
drop(id)
return 1
"""

# ARGV: queue, chunk. Removes up to `chunk` ready messages; the caller loops, so a huge queue
# never blocks the server for long.
_LUA_PURGE_READY = r"""
local zk = P .. 'q:' .. ARGV[1]
local ids = redis.call('ZRANGE', zk, 0, tonumber(ARGV[2]) - 1)
for _, id in ipairs(ids) do
  redis.call('ZREM', zk, id)
  drop(id)
end
return #ids
"""

# ARGV: queue. The schedule is shared by all queues, so this walks it once.
_LUA_PURGE_SCHEDULED = r"""
local n = 0
for _, id in ipairs(redis.call('ZRANGE', P .. 'sched', 0, -1)) do
  if redis.call('HGET', P .. 'm:' .. id, 'q') == ARGV[1] then
    redis.call('ZREM', P .. 'sched', id)
    drop(id)
    n = n + 1
  end
end
return n
"""

# Returns scheduled, running, dead, then (queue, ready count) for non-empty queues.
_LUA_STATS = r"""
surface(now())
local out = {redis.call('ZCARD', P .. 'sched'), redis.call('ZCARD', P .. 'lease'), redis.call('ZCARD', P .. 'dead')}
for _, q in ipairs(redis.call('SMEMBERS', P .. 'queues')) do
  local n = redis.call('ZCARD', P .. 'q:' .. q)
  if n > 0 then out[#out + 1] = q; out[#out + 1] = n end
end
return out
"""

# ARGV: seconds ahead, queue... 1 when a scheduled message of one of the queues comes due within
# that time, else 0. The schedule is shared by all queues: only its part due that soon is read.
_LUA_DUE_WITHIN = r"""
local wanted = {}
for i = 2, #ARGV do wanted[ARGV[i]] = true end
local ids = redis.call('ZRANGEBYSCORE', P .. 'sched', '-inf', fmt(now() + tonumber(ARGV[1])), 'LIMIT', 0, 1000)
for _, id in ipairs(ids) do
  local q = redis.call('HGET', P .. 'm:' .. id, 'q')
  if q and wanted[q] then return 1 end
end
return 0
"""

# Storing outcomes and acknowledging, as functions over a range of ARGV, so that a worker whose
# results live in this same Redis does both in one script (_LUA_SETTLE).
_LUA_OUTCOMES = r"""
-- ARGV[first..last]: (task id, state, final '1' or '0') triples. ttl and done_ttl in ms.
-- A final state is also the one element of done:<id> for a while, where blocked sync waiters
-- (BLMOVE from the list onto itself, which leaves it in place for the next waiter) pick it up,
-- and it goes with its change signal on task:<id>, which saves async waiters a read.
local function put_states(ttl, done_ttl, first, last)
  for i = first, last, 3 do
    local id = ARGV[i]
    local k = P .. 'state:' .. id
    if ttl > 0 then
      redis.call('SET', k, ARGV[i + 1], 'PX', ttl)
    else
      redis.call('SET', k, ARGV[i + 1])
    end
    -- done:<id> holds the latest state only while it is final (a replayed task starts over).
    local d = P .. 'done:' .. id
    redis.call('DEL', d)
    if ARGV[i + 2] == '1' then
      redis.call('RPUSH', d, ARGV[i + 1])
      redis.call('PEXPIRE', d, done_ttl)
      redis.call('PUBLISH', P .. 'task:' .. id, ARGV[i + 1])
    else
      redis.call('PUBLISH', P .. 'task:' .. id, '')
    end
  end
end
-- ARGV[first..last]: ids of messages whose outcome is stored.
local function ack(first, last)
  for i = first, last do
    local id = ARGV[i]
    local mk = P .. 'm:' .. id
    local v = redis.call('HMGET', mk, 'q', 'k')
    -- A message whose lease ran out may be back in its queue; the outcome is stored all the same.
    if redis.call('ZREM', P .. 'lease', id) == 0 and v[1] then
      redis.call('ZREM', P .. 'q:' .. v[1], id)
      redis.call('ZREM', P .. 'sched', id)
    end
    if v[1] then
      release_key(id, v[2])
      redis.call('DEL', mk)
    end
  end
  return last - first + 1
end
"""

# ARGV: ttl in ms (0 = none), then (task id, state) pairs. Only where no state is stored.
_LUA_PUT_STATES_IF_ABSENT = r"""
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
  local id = ARGV[i]
  local stored
  if ttl > 0 then
    stored = redis.call('SET', P .. 'state:' .. id, ARGV[i + 1], 'NX', 'PX', ttl)
  else
    stored = redis.call('SET', P .. 'state:' .. id, ARGV[i + 1], 'NX')
  end
  if stored then
    redis.call('DEL', P .. 'done:' .. id)
    redis.call('PUBLISH', P .. 'task:' .. id, '')
  end
end
return 1
"""

# ARGV: ttl in ms (0 = none), ttl of a done list in ms, then (task id, state, final) triples.
_LUA_PUT_STATES = "put_states(tonumber(ARGV[1]), tonumber(ARGV[2]), 3, #ARGV) return 1"

# ARGV: ttl, done ttl, number of states n, n (task id, state, final) triples, number of acks m,
# m message ids, then optionally a claim without waiting: token, lease_s, limit, queue...
# Returns the claim's reply ({'0', ''} without one).
_LUA_SETTLE = r"""
local n = tonumber(ARGV[3])
put_states(tonumber(ARGV[1]), tonumber(ARGV[2]), 4, 3 + 3 * n)
local a = 4 + 3 * n
local m = tonumber(ARGV[a])
ack(a + 1, a + m)
local c = a + m + 1
if c > #ARGV then return {'0', ''} end
return claim(ARGV[c], tonumber(ARGV[c + 1]), tonumber(ARGV[c + 2]), '', 0, '', {unpack(ARGV, c + 3)})
"""

# KEYS[1]: the counter. ARGV: amount, ttl in ms (0 = none).
# KEYS: the keys; ARGV[1]: TTL in ms (0: none), then one value per key. Returns per key nil
# where the value was stored, else the value held.
_LUA_SET_MANY_IF_ABSENT = r"""
local ttl = tonumber(ARGV[1])
local out = {}
for i = 1, #KEYS do
  local stored
  if ttl > 0 then
    stored = redis.call('SET', KEYS[i], ARGV[i + 1], 'NX', 'PX', ttl)
  else
    stored = redis.call('SET', KEYS[i], ARGV[i + 1], 'NX')
  end
  if stored then out[i] = false else out[i] = redis.call('GET', KEYS[i]) end
end
return out
"""

# ARGV: ttl, done ttl, number of states n, n (task id, state, final) triples, then the TTL in ms
# of the keys to set (0: none) and (key, value) pairs. Returns per key what
# _LUA_SET_MANY_IF_ABSENT does.
_LUA_PUT_STATES_SET_MANY = r"""
local n = tonumber(ARGV[3])
put_states(tonumber(ARGV[1]), tonumber(ARGV[2]), 4, 3 + 3 * n)
local ttl = tonumber(ARGV[4 + 3 * n])
local out = {}
for i = 5 + 3 * n, #ARGV, 2 do
  local k = P .. 'kv:' .. ARGV[i]
  local stored
  if ttl > 0 then
    stored = redis.call('SET', k, ARGV[i + 1], 'NX', 'PX', ttl)
  else
    stored = redis.call('SET', k, ARGV[i + 1], 'NX')
  end
  if stored then out[#out + 1] = false else out[#out + 1] = redis.call('GET', k) end
end
return out
"""

_LUA_INCR = r"""
local existed = redis.call('EXISTS', KEYS[1])
local v = redis.call('INCRBY', KEYS[1], ARGV[1])
if existed == 0 and tonumber(ARGV[2]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return v
"""


# --- connections and errors ------------------------------------------------------------------

# Errors that retrying cannot fix: the server answered, and said no.
_FINAL_CONNECT_ERRORS = (
    AuthenticationError,
    AuthorizationError,
    AuthenticationWrongNumberOfArgsError,
    NoPermissionError,
    ResponseError,
)


def _reason(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def _translate(masked: str, e: Exception) -> Exception:
    """The offload error for a redis-py error, naming the masked URL. Callers raise it from e."""
    if isinstance(e, RedisConnectionError | RedisTimeoutError | TimeoutError):
        return BrokerUnavailable(masked, _reason(e))
    return BrokerError(f"redis at {masked}: {_reason(e)}")


def _sent_directly_failed(masked: str, e: Exception) -> Exception | None:
    """After a command written and read on a connection directly (without the client's layers)
    failed: None when the client's usual path should take it over, which loads a lost script
    and reconnects a cut connection; else the error to raise. A timeout is not tried again: it
    has had its time. redis-py's Connection drops itself on any failure while sending or
    reading (a cancellation too), so no late reply can reach the next command."""
    if isinstance(e, NoScriptError | RedisConnectionError):
        return None
    return _translate(masked, e)


def _connection_kwargs(url: BrokerURL, namespace: str) -> dict[str, Any]:
    db_text = url.path.strip("/") or "0"
    try:
        db = int(db_text)
    except ValueError:
        raise ConfigError(f"{url.masked}: the path must be a database number, like /0") from None
    kwargs: dict[str, Any] = {
        "host": url.host or "localhost",
        "port": url.port or 6379,
        "db": db,
        "username": url.username,
        "password": url.password,
        "socket_connect_timeout": _CONNECT_BUDGET_S,
        "socket_keepalive": True,
        "socket_keepalive_options": {getattr(socket, name): value for name, value in _KEEPALIVE.items()},
        "client_name": f"offload:{namespace}",
        "connection_class": Connection,
    }
    if url.scheme == "rediss":
        kwargs["connection_class"] = SSLConnection
        cert_reqs = url.params.get("ssl_cert_reqs", "required")
        if cert_reqs not in ("none", "optional", "required"):
            raise ConfigError(f"{url.masked}: ssl_cert_reqs must be none, optional or required")
        kwargs["ssl_cert_reqs"] = cert_reqs
        if "ssl_ca_certs" in url.params:
            kwargs["ssl_ca_certs"] = url.params["ssl_ca_certs"]
    return kwargs


class _Commands:
    """Runs operations on one dedicated connection while it is free, on a pool when it is not.

    A worker or a web request usually has one operation in flight; a dedicated connection
    skips the pool's bookkeeping on each of them. Bursts (many concurrent enqueues) overflow
    into a bounded pool instead of queueing behind one connection. Both reconnect with backoff.
    """

    def __init__(self, url: BrokerURL, namespace: str) -> None:
        self.masked = url.masked
        common = _connection_kwargs(url, namespace)
        common["retry"] = Retry(ExponentialBackoff(cap=1.0, base=0.05), _RETRIES)
        common["socket_timeout"] = None  # bounded by _OPERATION_TIMEOUT_S instead
        max_connections = int(url.param_float("max_connections", _MAX_CONNECTIONS))
        self.fast = Redis(connection_pool=ConnectionPool(max_connections=1, **common), single_connection_client=True)
        self.pool = Redis.from_pool(BlockingConnectionPool(max_connections=max_connections, timeout=None, **common))
        self._busy = False

    async def run(self, op: Callable[[Redis], Awaitable[_T]]) -> _T:
        try:
            async with asyncio.timeout(_OPERATION_TIMEOUT_S):
                if self._busy:
                    return await op(self.pool)
                self._busy = True
                try:
                    return await op(self.fast)
                finally:
                    self._busy = False
        except (RedisError, TimeoutError) as e:
            raise _translate(self.masked, e) from e

    async def script(self, script: AsyncScript, keys: list[str], args: Sequence[Any]) -> Any:
        conn = self.fast.connection
        if self._busy or conn is None or not conn.is_connected:
            return await self.run(lambda c: script(keys=keys, args=args, client=c))
        # The path of every task's claim and outcome: one EVALSHA written and read on the
        # dedicated connection, without the client's layers around each command (its lock,
        # retry wrapper and metrics hooks cost about a fifth of the call's CPU). Anything
        # unusual takes the usual path, which reconnects, retries and loads the script.
        self._busy = True
        try:
            async with asyncio.timeout(_OPERATION_TIMEOUT_S):
                await conn.send_packed_command(
                    conn.pack_command("EVALSHA", script.sha, len(keys), *keys, *args), check_health=False
                )
                return await conn.read_response()
        except (RedisError, TimeoutError) as e:
            error = _sent_directly_failed(self.masked, e)
            if error is not None:
                raise error from e
        finally:
            self._busy = False
        return await self.run(lambda c: script(keys=keys, args=args, client=c))

    async def load(self, scripts: Iterable[AsyncScript]) -> None:
        async def load_all(c: Redis) -> None:
            for script in scripts:
                await c.script_load(script.script)

        await self.run(load_all)

    async def close(self) -> None:
        await self.fast.aclose(close_connection_pool=True)
        await self.pool.aclose()


def _pubsub_client(url: BrokerURL, namespace: str) -> Redis:
    # No retries inside redis-py: the hub notices a drop itself, rebuilds the connection and
    # resubscribes, which redis-py's own reconnect would not do for raw SUBSCRIBE commands.
    # Its reads carry their own timeouts, so no socket_timeout (see _OPERATION_TIMEOUT_S).
    pool = ConnectionPool(
        max_connections=8,
        socket_timeout=None,
        retry=Retry(NoBackoff(), 0),
        **_connection_kwargs(url, namespace),
    )
    return Redis.from_pool(pool)


async def _connect_bounded(url: BrokerURL, attempt: Callable[[], Awaitable[None]]) -> None:
    """Run ``attempt`` until it succeeds, for at most _CONNECT_BUDGET_S; then BrokerUnavailable."""

    async def once(left_s: float) -> None:
        try:
            await asyncio.wait_for(attempt(), left_s)
        except _FINAL_CONNECT_ERRORS as e:
            raise BrokerUnavailable(url.masked, _reason(e)) from e

    def transient(e: BaseException) -> str | None:
        return _reason(e) if isinstance(e, RedisError | OSError | TimeoutError) else None

    def give_up(reason: str, e: BaseException) -> BaseException:
        error = BrokerUnavailable(url.masked, f"{reason} (gave up after {_CONNECT_BUDGET_S:g} s)")
        error.__cause__ = e
        return error

    # Pauses of 0.1, 0.2, 0.4... s: the budget, not a cap, ends them.
    await retry_within(_CONNECT_BUDGET_S, once, transient, give_up, Backoff(first_s=0.1, cap_s=_CONNECT_BUDGET_S))


def _s(value: bytes) -> str:
    return value.decode()


# --- pub/sub ---------------------------------------------------------------------------------


class _Sink(Protocol):
    def deliver(self, channel: bytes, data: bytes) -> None:
        """A message arrived on a channel this sink is registered for."""

    def reset(self) -> None:
        """The connection was rebuilt; messages may have been missed."""


class _Flag:
    """An event with "was it set since I last looked" semantics, for one waiter at a time."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self, timeout_s: float) -> bool:
        if not self._event.is_set():
            if timeout_s <= 0:
                return False
            try:
                async with asyncio.timeout(timeout_s):
                    await self._event.wait()
            except TimeoutError:
                return False
        self._event.clear()
        return True


class _Hub:
    """One pub/sub connection shared by every waiter of one broker or store object.

    Thousands of watchers cost one connection and one SUBSCRIBE per distinct channel. `add`
    returns once the server has processed the SUBSCRIBE (a PING sent behind it has come back),
    so a message published afterwards reaches the sink. When the connection drops, the reader
    rebuilds it, resubscribes every channel still wanted and resets every sink.
    """

    def __init__(self, client: Redis, masked: str) -> None:
        self._client = client
        self._masked = masked
        self._sinks: dict[bytes, set[_Sink]] = {}
        self._unsub: set[bytes] = set()  # no sinks left; UNSUBSCRIBE not sent yet
        self._ps: PubSub | None = None  # the live connection; None while reconnecting
        self._wlock = asyncio.Lock()  # keeps SUBSCRIBE/UNSUBSCRIBE/PING in the order decided
        self._barriers: dict[bytes, asyncio.Future[None]] = {}
        self._resync: bytes | None = None  # the PING closing a resubscription after a drop
        self._seq = 0
        self._reader: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._start_lock = asyncio.Lock()
        self._closed = False

    @property
    def started(self) -> bool:
        return self._reader is not None

    async def start(self) -> None:
        """Open the connection (redis errors propagate) and start reading."""
        async with self._start_lock:
            if self._reader is not None:
                return
            ps = self._client.pubsub()
            try:
                await ps.connect()  # type: ignore[no-untyped-call]
                await _send(ps, [("PING", b"start")])
                reply = await _read(ps, _CONNECT_BUDGET_S)
                if reply is None:
                    raise RedisTimeoutError("no reply to PING")
            except BaseException:
                await _close_pubsub(ps)
                raise
            self._ps = ps
            self._reader = asyncio.create_task(self._run(), name=f"offload-redis-pubsub {self._masked}")

    async def add(self, channels: Sequence[bytes], sink: _Sink) -> None:
        fresh: list[bytes] = []
        for c in channels:
            group = self._sinks.get(c)
            if group is None:
                group = self._sinks[c] = set()
                if c in self._unsub:
                    self._unsub.discard(c)  # still subscribed on the server
                else:
                    fresh.append(c)
            group.add(sink)
        try:
            await self._sync(fresh)
        except BaseException:
            self.remove(channels, sink)
            raise

    def remove(self, channels: Iterable[bytes], sink: _Sink) -> None:
        for c in channels:
            group = self._sinks.get(c)
            if group is None:
                continue
            group.discard(sink)
            if not group:
                del self._sinks[c]
                self._unsub.add(c)
        if self._unsub and not self._closed and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.get_running_loop().create_task(self._flush_unsubscribes())

    async def close(self) -> None:
        self._closed = True
        for task in (self._reader, self._flusher):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._reader = self._flusher = None
        self._release_barriers()
        if self._ps is not None:
            await _close_pubsub(self._ps)
            self._ps = None

    def _token(self) -> bytes:
        self._seq += 1
        return b"sync-%d" % self._seq

    def _release_barriers(self) -> None:
        for fut in self._barriers.values():
            if not fut.done():
                fut.set_result(None)
        self._barriers.clear()

    async def _sync(self, fresh: list[bytes]) -> None:
        async with self._wlock:
            ps = self._ps
            if ps is None:
                return  # reconnecting: the resubscription covers these channels and resets sinks
            if not fresh and not self._barriers and self._resync is None:
                return  # every SUBSCRIBE sent so far has been confirmed
            token = self._token()
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._barriers[token] = fut
            try:
                commands: list[tuple[bytes | str, ...]] = [("SUBSCRIBE", *fresh)] if fresh else []
                await _send(ps, [*commands, ("PING", token)])
            except (RedisError, OSError):
                # The reader sees the broken connection too; it resubscribes and resets sinks.
                self._barriers.pop(token, None)
                return
        await fut

    async def _flush_unsubscribes(self) -> None:
        while self._unsub:
            # Gather the channels given up meanwhile into one write, and keep a channel that is
            # watched again soon (a client re-entering a watch) from costing two round trips.
            await asyncio.sleep(_UNSUBSCRIBE_AFTER_S)
            async with self._wlock:
                gone = [c for c in self._unsub if c not in self._sinks]
                self._unsub.clear()
                ps = self._ps
                if ps is None or not gone:
                    continue
                try:
                    await _send(ps, [("UNSUBSCRIBE", *gone[i : i + 500]) for i in range(0, len(gone), 500)])
                except (RedisError, OSError):
                    return  # the new connection subscribes only the channels still wanted

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last_rx = loop.time()
        pinged = False
        while not self._closed:
            ps = self._ps
            try:
                if ps is None:
                    ps = await self._reconnect()
                    last_rx, pinged = loop.time(), False
                reply = await _read(ps, _PUBSUB_IDLE_S)
                if reply is None:
                    if pinged and loop.time() - last_rx > 2 * _PUBSUB_IDLE_S:
                        raise RedisConnectionError("no reply to PING on the pub/sub connection")
                    async with self._wlock:
                        await _send(ps, [("PING", b"idle")])
                    pinged = True
                    continue
                last_rx, pinged = loop.time(), False
                self._dispatch(reply)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a reader that dies silently would strand every waiter
                if self._closed:
                    return
                log.warning("redis pub/sub connection to %s lost (%s); reconnecting", self._masked, _reason(e))
                await self._drop(ps)

    def _dispatch(self, reply: Any) -> None:
        # Raw replies: [b"message", channel, data], [b"subscribe", channel, n]..., and the
        # answer to PING <token>: [b"pong", token] under RESP2 while subscribed, else the token.
        if isinstance(reply, bytes):
            kind, token = b"pong", reply
        else:
            kind, token = reply[0], reply[1]
        if kind == b"message":
            channel, data = reply[1], reply[2]
            for sink in tuple(self._sinks.get(channel, ())):
                try:
                    sink.deliver(channel, data)
                except Exception:
                    log.exception("pub/sub handler failed on %r", channel)
        elif kind == b"pong":
            if token == self._resync:
                self._resync = None
                self._reset_sinks()
            fut = self._barriers.pop(token, None)
            if fut is not None and not fut.done():
                fut.set_result(None)

    def _reset_sinks(self) -> None:
        for sink in {s for group in self._sinks.values() for s in group}:
            try:
                sink.reset()
            except Exception:
                log.exception("pub/sub reset handler failed")

    async def _drop(self, ps: PubSub | None) -> None:
        async with self._wlock:
            if self._ps is ps:
                self._ps = None
            self._resync = None
            self._unsub.clear()
            # Waiters return now; their sinks are reset once the new connection is subscribed.
            self._release_barriers()
        if ps is not None:
            await _close_pubsub(ps)

    async def _reconnect(self) -> PubSub:
        delay = 0.05
        while True:
            ps = self._client.pubsub()
            try:
                await ps.connect()  # type: ignore[no-untyped-call]
                async with self._wlock:
                    channels = list(self._sinks)
                    # The PING's reply tells the reader when every channel is subscribed again.
                    self._resync = token = self._token()
                    commands: list[tuple[bytes | str, ...]] = [
                        ("SUBSCRIBE", *channels[i : i + 500]) for i in range(0, len(channels), 500)
                    ]
                    await _send(ps, [*commands, ("PING", token)])
                    self._ps = ps
                log.info("redis pub/sub connection to %s restored", self._masked)
                return ps
            except (RedisError, OSError) as e:
                await _close_pubsub(ps)
                log.debug("redis pub/sub reconnect to %s failed: %s", self._masked, _reason(e))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)


async def _send(ps: PubSub, commands: Sequence[tuple[bytes | str, ...]]) -> None:
    """Write commands on the pub/sub connection in one go; the reader task reads the replies."""
    conn = ps.connection
    if conn is None:
        raise RedisConnectionError("pub/sub connection closed")
    await conn.send_packed_command(conn.pack_commands(commands), check_health=False)


async def _read(ps: PubSub, timeout_s: float) -> Any:
    """The next raw reply on the pub/sub connection, or None after ``timeout_s`` of silence.

    Read from the connection itself: PubSub's own read path would quietly reconnect after an
    error, to a connection subscribed to nothing, before reporting the error."""
    conn = ps.connection
    if conn is None:
        raise RedisConnectionError("pub/sub connection closed")
    # push_request: under RESP3 published messages arrive as pushes, not replies.
    return await conn.read_response(timeout=timeout_s, push_request=True)


async def _close_pubsub(ps: PubSub) -> None:
    with contextlib.suppress(Exception):
        await ps.aclose()  # type: ignore[no-untyped-call, unused-ignore]


class _Wakeups:
    """The broker's sink on its queues' wake channels: wakes the fetches waiting on a queue."""

    def __init__(self) -> None:
        self._by_channel: dict[bytes, set[_Flag]] = {}
        #: wake-ups seen (and reconnections, which may have lost some), fetches waiting or not
        self.count = 0

    def listen(self, channels: Sequence[bytes]) -> _Flag:
        flag = _Flag()
        for c in channels:
            self._by_channel.setdefault(c, set()).add(flag)
        return flag

    def forget(self, channels: Sequence[bytes], flag: _Flag) -> None:
        for c in channels:
            group = self._by_channel.get(c)
            if group is not None:
                group.discard(flag)
                if not group:
                    del self._by_channel[c]

    def deliver(self, channel: bytes, data: bytes) -> None:
        self.count += 1
        for flag in self._by_channel.get(channel, ()):
            flag.set()

    def reset(self) -> None:
        self.count += 1
        self.wake_all()

    def wake_all(self) -> None:
        for group in self._by_channel.values():
            for flag in group:
                flag.set()


@dataclass(slots=True)
class _Registration:
    """This broker object standing registered as a waiter on some queues, after a claim that
    found them empty. While it holds, a fetch on the same queues needs no claim of its own: an
    enqueue hands it the message, and anything else that makes a message ready (a requeue, a
    due scheduled message or lease) publishes a wake-up, which ends it."""

    waiter: str
    queues: tuple[str, ...]
    until: float  # loop time, a margin before the server forgets the registration
    left: int  # hand-offs it may still receive
    wakes: int  # the broker's wake-up count when it was made
    due: float | None  # loop time when a scheduled message or a lease comes due, if any

    def holds(self, queues: tuple[str, ...], now: float, wakes: int) -> bool:
        return (
            queues == self.queues and self.left > 0 and now < self.until and wakes == self.wakes
            and (self.due is None or now < self.due)
        )  # fmt: skip


@dataclass(slots=True)
class _Claiming:
    """A claim on its way that may register ``waiter``: hand-offs to it seen before its reply."""

    waiter: str
    handed: int = 0


class _Handed:
    """Messages an enqueue handed to this broker's blocked fetches (see ``hand()`` in the Lua):
    already leased to this process, kept until a fetch for their queue takes them."""

    def __init__(self, channel: bytes, wakeups: _Wakeups, on_handed: Callable[[str], None]) -> None:
        self._channel = channel
        self._wakeups = wakeups
        self._on_handed = on_handed
        self._items: list[Delivery] = []

    def deliver(self, channel: bytes, data: bytes) -> None:
        head, _, rest = data.partition(b"\n")
        try:
            n_waiter, n_id, n_queue, deliveries = (int(x) for x in head.split())
        except ValueError:
            log.warning("ignored a malformed hand-off on %s", channel.decode(errors="replace"))
            return
        at = n_waiter
        message_id, queue = rest[at : at + n_id].decode(), rest[at + n_id : at + n_id + n_queue].decode()
        body = rest[at + n_id + n_queue :]
        self._items.append(Delivery(message_id, queue, body, deliveries, receipt=str(deliveries)))
        self._on_handed(rest[:at].decode())
        self._wakeups.wake_all()  # whichever fetch listens on the queue takes it

    def reset(self) -> None:
        """Pub/sub was rebuilt: a hand-off lost meanwhile comes back when its lease runs out."""

    def take(self, queues: Sequence[str], limit: int) -> list[Delivery]:
        if not self._items:
            return []
        mine = [d for d in self._items if d.queue in queues][:limit]
        if mine:
            taken = {id(d) for d in mine}
            self._items = [d for d in self._items if id(d) not in taken]
        return mine

    def take_all(self) -> list[Delivery]:
        items, self._items = self._items, []
        return items


# --- broker ----------------------------------------------------------------------------------


class RedisBroker(Broker):
    writes_initial_state = True

    def __init__(self, url: BrokerURL, namespace: str) -> None:
        super().__init__(url, namespace)
        self._prefix = f"offload:{namespace}:"
        self._keys = [self._prefix]
        self._cmds = _Commands(url, namespace)
        self._ps_client = _pubsub_client(url, namespace)
        self._hub = _Hub(self._ps_client, url.masked)
        self._wakeups = _Wakeups()
        self._wake_subscribed: set[bytes] = set()
        self._hand_channel = f"{self._prefix}hand:{uuid.uuid4().hex}".encode()
        self._handed = _Handed(self._hand_channel, self._wakeups, self._on_handed)
        self._registration: _Registration | None = None
        self._claiming: _Claiming | None = None
        register = self._cmds.pool.register_script
        self._enqueue = register(_LUA_COMMON + _LUA_ENQUEUE)
        self._claim = register(_LUA_COMMON + _LUA_CLAIM_FN + _LUA_CLAIM)
        self._script_ack = register(_LUA_COMMON + _LUA_OUTCOMES + _LUA_ACK)
        self._settle = register(_LUA_COMMON + _LUA_OUTCOMES + _LUA_CLAIM_FN + _LUA_SETTLE)
        self._script_extend = register(_LUA_COMMON + _LUA_EXTEND)
        self._script_requeue = register(_LUA_COMMON + _LUA_REQUEUE)
        self._dead = register(_LUA_COMMON + _LUA_DEAD)
        self._dead_list = register(_LUA_COMMON + _LUA_DEAD_LIST)
        self._replay = register(_LUA_COMMON + _LUA_REPLAY)
        self._cancel = register(_LUA_COMMON + _LUA_CANCEL)
        self._purge_ready = register(_LUA_COMMON + _LUA_PURGE_READY)
        self._purge_scheduled = register(_LUA_COMMON + _LUA_PURGE_SCHEDULED)
        self._stats = register(_LUA_COMMON + _LUA_STATS)
        self._due_within = register(_LUA_COMMON + _LUA_DUE_WITHIN)
        self._scripts = [
            self._enqueue, self._claim, self._script_ack, self._settle, self._script_extend, self._script_requeue, self._dead,
            self._dead_list, self._replay, self._cancel, self._purge_ready, self._purge_scheduled,
            self._stats, self._due_within,
        ]  # fmt: skip

    async def connect(self) -> None:
        # Probe with the non-retrying client so the budget holds; the pub/sub connection opens
        # on the first waiting fetch, so a process that only enqueues never holds one.
        async def probe() -> None:
            await self._ps_client.ping()

        await _connect_bounded(self.url, probe)
        await self._cmds.load(self._scripts)

    async def close(self) -> None:
        await self._hub.close()
        # Handed to a fetch that is no longer waiting: back to the queue rather than waiting
        # for the lease to run out.
        for delivery in self._handed.take_all():
            with contextlib.suppress(BrokerError):
                await self.requeue(delivery)
        await self._ps_client.aclose()
        await self._cmds.close()

    async def enqueue(self, message: OutgoingMessage) -> str:
        return _s(await self._cmds.script(self._enqueue, self._keys, enqueue_args(message)))

    async def _fetch(self, queues: tuple[str, ...], limit: int, timeout_s: float) -> list[Delivery]:
        names = queues
        channels = [f"{self._prefix}wake:{q}".encode() for q in names]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout_s, 0.0)
        # Listen, and be subscribed, before the first claim registers us as waiting: an enqueue
        # landing right after that claim publishes, and the message must reach us.
        flag = self._wakeups.listen(channels)
        try:
            if timeout_s > 0:
                await self._subscribe_wakeups([*channels, self._hand_channel])
            while True:
                handed = self._handed.take(names, limit)
                if handed:
                    return handed
                now = loop.time()
                reg = self._registration
                if reg is None or not reg.holds(names, now, self._wakeups.count):
                    # Claim; finding nothing registers us, and the registration serves the next
                    # fetches too while it lasts: an idle worker is handed messages without a
                    # claim per message (see _Registration).
                    reg = self._registration = None
                    waiter = uuid.uuid4().hex
                    left = max(deadline - now, 0.0)
                    # Counted from before the claim: a wake-up or a hand-off that reaches the
                    # pub/sub connection ahead of the claim's reply must count against the
                    # registration, or it would stand for messages the server no longer sends.
                    wakes = self._wakeups.count
                    self._claiming = _Claiming(waiter)
                    try:
                        got, next_in = await self._claim_once(list(names), limit, uuid.uuid4().hex, waiter, left)
                    finally:
                        claiming, self._claiming = self._claiming, None
                    if got:
                        return got
                    now = loop.time()
                    due = None if next_in is None else now + next_in
                    if left > 0:
                        reg = _Registration(waiter, names, now + left + 1 - _REGISTRATION_MARGIN_S,
                                            limit - claiming.handed, wakes, due)  # fmt: skip
                        if self._hub.started and reg.left > 0:
                            self._registration = reg
                    if due is not None and due <= now:
                        continue
                left = deadline - now
                if left <= 0:
                    return []
                if reg is not None:
                    left = min(left, max(reg.until - now, 0.001))
                    if reg.due is not None:
                        left = min(left, max(reg.due - now, 0.001))
                await flag.wait(left)
        finally:
            self._wakeups.forget(channels, flag)

    def _on_handed(self, waiter: str) -> None:
        reg = self._registration
        if reg is not None and reg.waiter == waiter:
            reg.left -= 1
        elif self._claiming is not None and self._claiming.waiter == waiter:
            self._claiming.handed += 1

    async def _subscribe_wakeups(self, channels: list[bytes]) -> None:
        missing = [c for c in channels if c not in self._wake_subscribed]
        if not missing:
            return
        if not self._hub.started:
            await _connect_bounded(self.url, self._hub.start)
        hand = [c for c in missing if c == self._hand_channel]
        if hand:
            await self._hub.add(hand, self._handed)
        await self._hub.add([c for c in missing if c != self._hand_channel], self._wakeups)
        # Stay subscribed: a worker fetches from the same queues all its life.
        self._wake_subscribed.update(missing)

    async def _claim_once(
        self, queues: list[str], limit: int, token: str, waiter: str = "", wait_s: float = 0.0
    ) -> tuple[list[Delivery], float | None]:
        """One claim script call. ``token`` names the call: the same token returns the same leases.
        With ``wait_s`` > 0 and nothing ready, ``waiter`` is registered as waiting on the queues."""
        hand = self._hand_channel.decode() if wait_s > 0 and self._hub.started else ""
        args = [token, repr(float(self.lease_s)), limit, waiter, repr(wait_s), hand, *queues]
        return _claimed(await self._cmds.script(self._claim, self._keys, args))

    async def _ack(self, deliveries: Sequence[Delivery]) -> None:
        await self._cmds.script(self._script_ack, self._keys, [d.id for d in deliveries])

    def refills_with(self, store: Store) -> bool:
        # The results live here too: states, acks and the next claim go in one script.
        return isinstance(store, RedisStore) and store.url == self.url and store.namespace == self.namespace

    async def store_and_ack(
        self,
        store: Store,
        states: Sequence[tuple[str, bytes]],
        ttl_s: float | None,
        final: Collection[str],
        deliveries: Sequence[Delivery],
        refill: tuple[Sequence[str], int] | None = None,
    ) -> list[Delivery]:
        if not self.refills_with(store):
            return await super().store_and_ack(store, states, ttl_s, final, deliveries, refill)
        # The results live here too: states, acks and the next claim in one script, in that order.
        args = settle_args(states, ttl_s, final, [d.id for d in deliveries])
        if refill is not None:
            queues, limit = refill
            args += [uuid.uuid4().hex, repr(float(self.lease_s)), limit, *dict.fromkeys(queues)]
        return _claimed(await self._cmds.script(self._settle, self._keys, args))[0]

    async def _requeue(self, delivery: Delivery, body: bytes | None, delay_s: float) -> None:
        args = [
            delivery.id, _receipt(delivery), "0" if body is None else "1", body or b"", repr(max(float(delay_s), 0.0)),
        ]  # fmt: skip
        await self._cmds.script(self._script_requeue, self._keys, args)

    async def _extend(self, deliveries: Sequence[Delivery]) -> None:
        args: list[str] = [repr(float(self.lease_s))]
        for d in deliveries:
            args += [d.id, _receipt(d)]
        await self._cmds.script(self._script_extend, self._keys, args)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        await self._cmds.script(self._dead, self._keys, [delivery.id, delivery.queue, delivery.body, reason])

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        if limit <= 0:
            return []
        return _dead_letters(await self._cmds.script(self._dead_list, self._keys, [limit]))

    async def replay(self, ids: Sequence[str] | None = None) -> list[DeadLetter]:
        args = ["1"] if ids is None else ["0", *ids]
        return _dead_letters(await self._cmds.script(self._replay, self._keys, args))

    async def cancel(self, message_id: str) -> bool:
        return bool(await self._cmds.script(self._cancel, self._keys, [message_id]))

    async def purge(self, queue: str) -> int:
        total = 0
        while True:
            n = int(await self._cmds.script(self._purge_ready, self._keys, [queue, _PURGE_CHUNK]))
            total += n
            if n < _PURGE_CHUNK:
                break
        return total + int(await self._cmds.script(self._purge_scheduled, self._keys, [queue]))

    async def stats(self) -> QueueStats:
        reply = await self._cmds.script(self._stats, self._keys, [])
        queued = {_s(reply[i]): int(reply[i + 1]) for i in range(3, len(reply), 2)}
        return QueueStats(queued=queued, scheduled=int(reply[0]), running=int(reply[1]), dead=int(reply[2]))

    async def due_within(self, queues: Sequence[str], within_s: float) -> bool:
        if not queues:
            return False
        return bool(await self._cmds.script(self._due_within, self._keys, [f"{within_s:.6f}", *dict.fromkeys(queues)]))

    async def flush_namespace(self) -> None:
        await self._cmds.run(lambda c: _unlink_prefix(c, self._prefix))


def _claimed(reply: list[Any]) -> tuple[list[Delivery], float | None]:
    """A claim's reply: the leased deliveries, or none and when something may become ready."""
    if reply[0] == b"0":
        return [], float(reply[1]) if reply[1] else None
    return [
        Delivery(id=_s(reply[i]), queue=_s(reply[i + 1]), body=reply[i + 2], deliveries=int(reply[i + 3]), receipt=_s(reply[i + 3]))
        for i in range(1, len(reply), 4)
    ], None


def _receipt(delivery: Delivery) -> str:
    return "" if delivery.receipt is None else str(delivery.receipt)


def _dead_letters(reply: list[bytes]) -> list[DeadLetter]:
    return [
        DeadLetter(
            id=_s(reply[i]),
            queue=_s(reply[i + 1]),
            body=reply[i + 2],
            reason=_s(reply[i + 3]),
            died_at=float(reply[i + 4]),
        )
        for i in range(0, len(reply), 5)
    ]


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


async def _unlink_prefix(client: Redis, prefix: str) -> None:
    batch: list[bytes] = []
    async for key in client.scan_iter(match=_glob_escape(prefix) + "*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            await client.unlink(*batch)
            batch.clear()
    if batch:
        await client.unlink(*batch)


# --- store -----------------------------------------------------------------------------------


class _RedisWatch(Watch):
    """A watch is its own sink: any message on its tasks' channels, or a reconnect, wakes it. A
    message that carries a final state (see `put_states` in _LUA_OUTCOMES) is kept for
    `final_state`."""

    __slots__ = ("_finals", "_flag", "_ids")

    def __init__(self, ids: dict[bytes, str]) -> None:
        self._flag = _Flag()
        self._ids = ids  # channel -> task id
        self._finals: dict[str, bytes] = {}

    def deliver(self, channel: bytes, data: bytes) -> None:
        if data:
            self._finals[self._ids[channel]] = data
        self._flag.set()

    def final_state(self, task_id: str) -> bytes | None:
        return self._finals.get(task_id)

    def reset(self) -> None:
        self._flag.set()

    async def wait(self, timeout_s: float) -> bool:
        return await self._flag.wait(timeout_s)


class _ChannelSink:
    __slots__ = ("queue",)

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def deliver(self, channel: bytes, data: bytes) -> None:
        self.queue.put_nowait(data)

    def reset(self) -> None:
        """Pub/sub keeps no history: what was published while disconnected is gone."""


def enqueue_args(message: OutgoingMessage) -> list[str | bytes | int]:
    """ARGV of the enqueue script."""
    priority = min(max(int(message.priority), 0), 9)
    return [
        message.id, message.queue, message.body, priority,
        "" if message.eta is None else repr(float(message.eta)),
        "0" if message.key is None else "1", message.key or "",
        message.state or b"", ttl_ms(message.state_ttl_s) or 0,
    ]  # fmt: skip


def put_states_args(
    states: Sequence[tuple[str, bytes]], ttl_s: float | None, final: Collection[str]
) -> list[str | bytes | int]:
    """ARGV of the put-states script."""
    ttl = ttl_ms(ttl_s) or 0
    args: list[str | bytes | int] = [ttl, min(ttl or DONE_SIGNAL_MS, DONE_SIGNAL_MS)]
    for task_id, data in states:
        args += [task_id, data, "1" if task_id in final else "0"]
    return args


def settle_args(
    states: Sequence[tuple[str, bytes]], ttl_s: float | None, final: Collection[str], message_ids: Sequence[str]
) -> list[str | bytes | int]:
    """ARGV of the settle script: the states, then the messages to acknowledge."""
    ttl, done_ttl, *triples = put_states_args(states, ttl_s, final)
    return [ttl, done_ttl, len(states), *triples, len(message_ids), *message_ids]



class RedisStore(Store):
    def __init__(self, url: BrokerURL, namespace: str) -> None:
        super().__init__(url, namespace)
        self._prefix = f"offload:{namespace}:"
        self._keys = [self._prefix]
        self._cmds = _Commands(url, namespace)
        self._ps_client = _pubsub_client(url, namespace)
        self._hub = _Hub(self._ps_client, url.masked)
        self._script_put_states = self._cmds.pool.register_script(_LUA_COMMON + _LUA_OUTCOMES + _LUA_PUT_STATES)
        self._script_put_states_if_absent = self._cmds.pool.register_script(_LUA_COMMON + _LUA_PUT_STATES_IF_ABSENT)
        self._incr = self._cmds.pool.register_script(_LUA_INCR)
        self._set_many = self._cmds.pool.register_script(_LUA_SET_MANY_IF_ABSENT)
        self._put_states_set_many = self._cmds.pool.register_script(
            _LUA_COMMON + _LUA_OUTCOMES + _LUA_PUT_STATES_SET_MANY
        )

    async def connect(self) -> None:
        # Workers only write states, so the pub/sub connection opens on the first watch or
        # subscribe; the probe uses the same non-retrying client to stay within its budget.
        async def probe() -> None:
            await self._ps_client.ping()

        await _connect_bounded(self.url, probe)
        await self._cmds.load([self._script_put_states, self._script_put_states_if_absent, self._incr])

    async def close(self) -> None:
        await self._hub.close()
        await self._ps_client.aclose()
        await self._cmds.close()

    def _state_key(self, task_id: str) -> str:
        return f"{self._prefix}state:{task_id}"

    def _kv(self, key: str) -> str:
        return f"{self._prefix}kv:{key}"

    async def _put_states(self, states: Sequence[tuple[str, bytes]], ttl_s: float | None, final: Collection[str]) -> None:
        # One script rather than a pipeline: the same single round trip, and the states and
        # their change signals are written together.
        await self._cmds.script(self._script_put_states, self._keys, put_states_args(states, ttl_s, final))

    async def _put_states_if_absent(self, states: Sequence[tuple[str, bytes]], ttl_s: float | None) -> None:
        args = [ttl_ms(ttl_s) or 0, *(v for task_id, data in states for v in (task_id, data))]
        await self._cmds.script(self._script_put_states_if_absent, self._keys, args)

    async def get_states(self, task_ids: Sequence[str]) -> list[bytes | None]:
        if not task_ids:
            return []
        keys = [self._state_key(t) for t in task_ids]
        values = await self._cmds.run(lambda c: c.mget(keys))
        return cast("list[bytes | None]", values)

    async def _start_hub(self) -> None:
        if not self._hub.started:
            await _connect_bounded(self.url, self._hub.start)

    @asynccontextmanager
    async def watch(self, task_ids: Sequence[str]) -> AsyncIterator[Watch]:
        await self._start_hub()
        ids = {f"{self._prefix}task:{t}".encode(): t for t in task_ids}
        watch = _RedisWatch(ids)
        channels = list(ids)
        await self._hub.add(channels, watch)
        try:
            yield watch
        finally:
            self._hub.remove(channels, watch)

    async def publish(self, channel: str, data: bytes) -> None:
        name = f"{self._prefix}chan:{channel}"
        await self._cmds.run(lambda c: c.publish(name, data))

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[AsyncIterator[bytes]]:
        await self._start_hub()
        sink = _ChannelSink()
        channels = [f"{self._prefix}chan:{channel}".encode()]
        await self._hub.add(channels, sink)

        async def messages() -> AsyncIterator[bytes]:
            while True:
                yield await sink.queue.get()

        try:
            yield messages()
        finally:
            self._hub.remove(channels, sink)

    async def set_if_absent(self, key: str, value: bytes, ttl_s: float | None = None) -> bool:
        k, px = self._kv(key), ttl_ms(ttl_s)
        return bool(await self._cmds.run(lambda c: c.set(k, value, nx=True, px=px)))

    async def set_many_if_absent(self, items: Sequence[tuple[str, bytes]], ttl_s: float | None = None) -> list[bytes | None]:
        if not items:
            return []
        # One script: one round trip for all the keys (the script loads itself on first use).
        keys = [self._kv(k) for k, _ in items]
        args: list[bytes | int] = [ttl_ms(ttl_s) or 0, *(v for _, v in items)]
        return cast("list[bytes | None]", await self._cmds.script(self._set_many, keys, args))

    async def put_states_and_set_many_if_absent(
        self,
        states: Sequence[tuple[str, bytes]],
        ttl_s: float | None,
        final: Collection[str],
        items: Sequence[tuple[str, bytes]],
        items_ttl_s: float | None = None,
    ) -> list[bytes | None]:
        ttl, done_ttl, *triples = put_states_args(states, ttl_s, final)
        args = [ttl, done_ttl, len(states), *triples, ttl_ms(items_ttl_s) or 0]
        args += [v for key, value in items for v in (key, value)]
        # One script: the states and the keys in one round trip.
        held = await self._cmds.script(self._put_states_set_many, self._keys, args)
        return cast("list[bytes | None]", held)

    async def get_value(self, key: str) -> bytes | None:
        k = self._kv(key)
        value = await self._cmds.run(lambda c: c.get(k))
        return cast("bytes | None", value)

    async def delete_value(self, key: str) -> None:
        k = self._kv(key)
        await self._cmds.run(lambda c: c.delete(k))

    async def incr(self, key: str, amount: int = 1, ttl_s: float | None = None) -> int:
        args = [int(amount), ttl_ms(ttl_s) or 0]
        return int(await self._cmds.script(self._incr, [self._kv(key)], args))

    async def flush_namespace(self) -> None:
        await self._cmds.run(lambda c: _unlink_prefix(c, self._prefix))


def make_broker(url: BrokerURL, namespace: str) -> Broker:
    return RedisBroker(url, namespace)


def make_store(url: BrokerURL, namespace: str) -> Store:
    return RedisStore(url, namespace)


def make_direct(url: BrokerURL, namespace: str) -> Direct:
    from offload.brokers.redis_direct import RedisDirect  # the sync client, only when used

    return RedisDirect(url, namespace)
