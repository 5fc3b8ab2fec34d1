"""The Lua scripts of the Redis pool store: every move that two processes could race on.

A claim pops exactly one ready environment for exactly one session; a reservation checks the
pool's level and adds booting environments in the same step, so two prewarmers cannot both fill
the same gap; marking ready and retiring succeed only from the states the domain allows; a lock
is released only by its holder. Every key a script touches comes in through KEYS, and all of
them are keys of one pool, in its hash slot (``hash_tags.pool_tag``): they run on a Redis
Cluster as well.
"""

from __future__ import annotations

from typing import Final

CLAIM: Final = """
-- KEYS: ready, claimed, the pool's arrivals, this minute's outcomes, its totals, then the records
-- of the oldest ready environments (the candidates the caller listed). ARGV: session id, now,
-- claimed record ttl, '1' to count the claim as an arrival and a hit (else '0'), arrivals older
-- than this go, arrivals ttl, minute outcomes ttl, then the candidates' ids.
-- Claims the first candidate still in the ready set with a ready record; drops the others it
-- passes (taken by another claim meanwhile, or their record gone). False: none was claimable.
for n = 6, #KEYS do
  local env_id = ARGV[n + 2]
  if redis.call('ZREM', KEYS[1], env_id) == 1
      and redis.call('HGET', KEYS[n], 'state') == 'ready' then
    redis.call('HSET', KEYS[n], 'state', 'claimed', 'session_id', ARGV[1], 'claimed_at', ARGV[2])
    redis.call('EXPIRE', KEYS[n], ARGV[3])
    redis.call('ZADD', KEYS[2], ARGV[2], env_id)
    if ARGV[4] == '1' then  -- as PoolCounters.record_claim counts a hit
      redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
      redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[5])
      redis.call('EXPIRE', KEYS[3], ARGV[6])
      redis.call('HINCRBY', KEYS[4], 'hits', 1)
      redis.call('EXPIRE', KEYS[4], ARGV[7])
      redis.call('HINCRBY', KEYS[5], 'hits', 1)
    end
    local record = redis.call('HGETALL', KEYS[n])
    table.insert(record, 1, env_id)
    return record
  end
end
return false
"""

RESERVE: Final = """
-- KEYS: ready, inflight, then each new environment's record. ARGV: ceiling, max in flight, now,
-- region, template, then (env id, token) of each new environment, in the order of KEYS.
-- Adds what fits under both bounds; returns the ids added.
local booting = redis.call('ZCARD', KEYS[2])
local held = redis.call('ZCARD', KEYS[1]) + booting
local room = math.min(tonumber(ARGV[1]) - held, tonumber(ARGV[2]) - booting)
local added = {}
local n = 3
while room > 0 and KEYS[n] do
  local env_id = ARGV[2 * n]
  if redis.call('EXISTS', KEYS[n]) == 0 then
    redis.call('HSET', KEYS[n], 'state', 'booting', 'region', ARGV[4], 'template', ARGV[5],
      'token', ARGV[2 * n + 1], 'created_at', ARGV[3], 'unschedulable', '0')
    redis.call('ZADD', KEYS[2], ARGV[3], env_id)
    added[#added + 1] = env_id
    room = room - 1
  end
  n = n + 1
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
