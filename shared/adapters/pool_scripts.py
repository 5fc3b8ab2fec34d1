"""The Lua scripts of the Redis pool store: every move that two processes could race on.

A claim pops exactly one ready environment for exactly one session; a reservation checks the
pool's level and adds booting environments in the same step, so two prewarmers cannot both fill
the same gap; marking ready and retiring succeed only from the states the domain allows; a lock
is released only by its holder. The scripts build the environment keys from a prefix, which is
fine on one Redis (not on Redis Cluster).
"""

from __future__ import annotations

from typing import Final

CLAIM: Final = """
-- KEYS: ready, claimed. ARGV: env key prefix, session id, now, claimed record ttl.
while true do
  local popped = redis.call('ZPOPMIN', KEYS[1])
  if #popped == 0 then return false end
  local env_key = ARGV[1] .. popped[1]
  if redis.call('HGET', env_key, 'state') == 'ready' then
    redis.call('HSET', env_key, 'state', 'claimed', 'session_id', ARGV[2], 'claimed_at', ARGV[3])
    redis.call('EXPIRE', env_key, ARGV[4])
    redis.call('ZADD', KEYS[2], ARGV[3], popped[1])
    local record = redis.call('HGETALL', env_key)
    table.insert(record, 1, popped[1])
    return record
  end
end
"""

RESERVE: Final = """
-- KEYS: ready, inflight, known pools. ARGV: ceiling, max in flight, env key prefix, now, region,
-- template, then (env id, token) pairs. Adds what fits under both bounds; returns the ids added.
local booting = redis.call('ZCARD', KEYS[2])
local held = redis.call('ZCARD', KEYS[1]) + booting
local room = math.min(tonumber(ARGV[1]) - held, tonumber(ARGV[2]) - booting)
local added = {}
local i = 7
while room > 0 and ARGV[i] do
  local env_key = ARGV[3] .. ARGV[i]
  if redis.call('EXISTS', env_key) == 0 then
    redis.call('HSET', env_key, 'state', 'booting', 'region', ARGV[5], 'template', ARGV[6],
      'token', ARGV[i + 1], 'created_at', ARGV[4], 'unschedulable', '0')
    redis.call('ZADD', KEYS[2], ARGV[4], ARGV[i])
    redis.call('SADD', KEYS[3], ARGV[5] .. '/' .. ARGV[6])
    added[#added + 1] = ARGV[i]
    room = room - 1
  end
  i = i + 2
end
return added
"""

MARK_READY: Final = """
-- KEYS: inflight, ready, env key. ARGV: env id, now, VMs as JSON.
if redis.call('HGET', KEYS[3], 'state') ~= 'booting' then return 0 end
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[3], 'state', 'ready', 'ready_at', ARGV[2], 'vms', ARGV[3],
  'unschedulable', '0')
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1
"""

RETIRE: Final = """
-- KEYS: ready, inflight, env key. ARGV: env id, retired record ttl.
local state = redis.call('HGET', KEYS[3], 'state')
local removed = redis.call('ZREM', KEYS[1], ARGV[1]) + redis.call('ZREM', KEYS[2], ARGV[1])
if state == 'booting' or state == 'ready' then
  redis.call('HSET', KEYS[3], 'state', 'retired')
  redis.call('EXPIRE', KEYS[3], ARGV[2])
  return 1
end
if not state and removed > 0 then return 1 end
return 0
"""

MARK_UNSCHEDULABLE: Final = """
-- KEYS: env key. ARGV: '1' or '0'.
if redis.call('HGET', KEYS[1], 'state') ~= 'booting' then return 0 end
redis.call('HSET', KEYS[1], 'unschedulable', ARGV[1])
return 1
"""

UNLOCK: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
