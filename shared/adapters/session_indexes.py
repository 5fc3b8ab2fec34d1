"""Where a session's keys are, and the readers of the indexes that list sessions.

Every key about a session carries its shard's hash tag (``hash_tags.session_tag``), so that the
transaction that updates a session stays in one hash slot of a Redis Cluster:

- per session: ``labvirt:session:{sNN}:<id>`` (the document), ``labvirt:events:{sNN}:<id>``
  (its progress events, ``session_events``), ``labvirt:conns:{sNN}:<id>`` (``connections``);
- per shard: the deadlines ``labvirt:deadline:{sNN}:<kind>``, the user index
  ``labvirt:user:{sNN}:<user>``, the region indexes ``labvirt:live:{sNN}:<region>``,
  ``labvirt:live-template:{sNN}:<region>:<template>`` and ``labvirt:booting:{sNN}:<region>``.

A session's transaction writes only its own shard's entries; the readers below read every shard
in one pipeline and merge what they find.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

import redis

from shared.adapters.hash_tags import SESSION_TAGS, session_tag
from shared.domain.sessions import SessionId

PREFIX: Final = "labvirt"


def session_key(session_id: str) -> str:
    return f"{PREFIX}:session:{session_tag(session_id)}:{session_id}"


def deadline_key(kind: str, tag: str) -> str:
    return f"{PREFIX}:deadline:{tag}:{kind}"


def user_key(user: str, tag: str) -> str:
    return f"{PREFIX}:user:{tag}:{user}"


def region_key(region: str, tag: str) -> str:
    return f"{PREFIX}:live:{tag}:{region}"


def region_template_key(region: str, template: str, tag: str) -> str:
    """The live sessions of one template in one region: what a region's load is counted from."""
    return f"{PREFIX}:live-template:{tag}:{region}:{template}"


def region_booting_key(region: str, tag: str) -> str:
    return f"{PREFIX}:booting:{tag}:{region}"  # provisioning sessions: the region's booting cap


def queue_user_ids(pipe: Any, user: str) -> None:
    """Queue the reads of ``user``'s index, one per shard (``merged_members`` reads them)."""
    for tag in SESSION_TAGS:
        pipe.smembers(user_key(user, tag))


def merged_members(answers: Iterable[Any]) -> list[str]:
    """The members of sets read in one pipeline, merged and sorted."""
    return sorted({_text(m) for members in answers for m in members})


@dataclass(frozen=True)
class LiveCount:
    """Sessions not yet final in one region: all of them, those indexed by template, and
    those still provisioning (booting their environment)."""

    total: int
    by_template: Mapping[str, int]
    booting: int = 0

    @property
    def unindexed(self) -> int:
        """Sessions of no template asked about (stored before the per-template index, or of
        a template no longer configured)."""
        return max(0, self.total - sum(self.by_template.values()))


class SessionIndexes:
    """Reads across the shards (each command names keys of one slot; the pipelines do not
    need a transaction, so a cluster-aware client may send them to several nodes)."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    def documents(self, session_ids: Sequence[str]) -> dict[str, bytes]:
        """The raw documents that exist among ``session_ids``, in one round trip (a GET each:
        the documents are in many slots, and cluster-aware clients split no MGET)."""
        pipe = self._redis.pipeline(transaction=False)
        for session_id in session_ids:
            pipe.get(session_key(session_id))
        raws = pipe.execute() if session_ids else []
        return {i: raw for i, raw in zip(session_ids, raws, strict=True) if raw is not None}

    def user_ids(self, user: str) -> list[str]:
        return self._members(user_key(user, tag) for tag in SESSION_TAGS)

    def region_ids(self, region: str) -> list[str]:
        return self._members(region_key(region, tag) for tag in SESSION_TAGS)

    def forget_region_ids(self, region: str, session_ids: Iterable[str]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for session_id in session_ids:
            pipe.srem(region_key(region, session_tag(session_id)), session_id)
        pipe.execute()

    def live_ids(self) -> list[str]:
        """Every id in any region's live index (scanned: operators' listings, not hot paths)."""
        return self._members(self._redis.scan_iter(match=f"{PREFIX}:live:*", count=1000))

    def live_counts(self, regions: Sequence[str], templates: Sequence[str]) -> dict[str, LiveCount]:
        """How many sessions not yet final each region holds, in all, per template and still
        provisioning (one round trip; the counts come from the indexes the session's own
        transactions keep)."""
        pipe = self._redis.pipeline(transaction=False)
        for region in regions:
            for tag in SESSION_TAGS:
                pipe.scard(region_key(region, tag))
                pipe.scard(region_booting_key(region, tag))
                for template in templates:
                    pipe.scard(region_template_key(region, template, tag))
        counts = iter(int(n) for n in pipe.execute())
        found: dict[str, LiveCount] = {}
        for region in regions:
            total = booting = 0
            by_template = dict.fromkeys(templates, 0)
            for _ in SESSION_TAGS:
                total += next(counts)
                booting += next(counts)
                for template in templates:
                    by_template[template] += next(counts)
            found[region] = LiveCount(total, by_template, booting=booting)
        return found

    def due(self, kind: str, now: float, limit: int) -> list[SessionId]:
        """Sessions whose ``kind`` deadline has passed, oldest first, at most ``limit``."""
        pipe = self._redis.pipeline(transaction=False)
        for tag in SESSION_TAGS:
            key = deadline_key(kind, tag)
            pipe.zrangebyscore(key, "-inf", now, start=0, num=limit, withscores=True)
        entries = sorted(
            (float(score), _text(member))
            for shard in pipe.execute()
            for member, score in cast(list[Any], shard)
        )
        return [SessionId(member) for _, member in entries[:limit]]

    def forget_deadline(self, kind: str, session_id: str) -> None:
        self._redis.zrem(deadline_key(kind, session_tag(session_id)), session_id)

    def count_deadlines(self, kind: str) -> int:
        pipe = self._redis.pipeline(transaction=False)
        for tag in SESSION_TAGS:
            pipe.zcard(deadline_key(kind, tag))
        return sum(int(n) for n in pipe.execute())

    def deadline(self, kind: str, session_id: str) -> float | None:
        score = self._redis.zscore(deadline_key(kind, session_tag(session_id)), session_id)
        return None if score is None else float(score)

    def _members(self, keys: Iterable[Any]) -> list[str]:
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            pipe.smembers(key)
        return merged_members(pipe.execute())


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
