"""Hash tags: which keys Redis Cluster keeps in one hash slot, so that they can change together.

A cluster runs a transaction (WATCH/MULTI/EXEC) or a Lua script only on keys of one slot, and
a key's slot is taken from its hash tag, the text between its first ``{`` and the next ``}``.
Every key therefore carries the tag of what changes with it, placed before any part a user
controls (a user name with braces must not pick its own slot):

- a session: one of ``SESSION_SHARDS`` tags chosen from its id (``{s07}``). A session's update
  writes its document, its event stream and its entries in the deadline, user and region
  indexes in one MULTI, and the gateway's scripts move its connections, the leases and the
  disconnected set together: those indexes are split into one part per shard, each in its
  shard's slot, and their readers read every shard in one pipeline. Sixteen shards spread the
  sessions over a cluster's masters and keep those reads short;
- a warm pool: its region and template (``{eu/ubuntu}``), for its sets, counters and the
  records of its environments, which its scripts move between them;
- dead letters: one tag for all (``dead_letters``), their index being global by nature.

Pipelines without a transaction may span slots: a cluster-aware client splits them per node.

The shard count and the tags are part of the key layout: changing them moves every key.
"""

from __future__ import annotations

import zlib
from typing import Final

SESSION_SHARDS: Final = 16
SESSION_TAGS: Final = tuple(f"{{s{shard:02d}}}" for shard in range(SESSION_SHARDS))


def session_tag(session_id: str) -> str:
    """The tag of every key about ``session_id`` (stable across processes and releases)."""
    return SESSION_TAGS[zlib.crc32(session_id.encode()) % SESSION_SHARDS]


def pool_tag(region: str, template: str) -> str:
    return f"{{{region}/{template}}}"
