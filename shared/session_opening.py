"""Opening a session: the create path of ``SessionLife.open``, in few round trips to Redis.

Under the user's lock: admission (reconnect, refuse, or open, closing replaced sessions), the
region, a warm claim or a cold start, the session stored, its first task queued. A warm claim,
the product's promise of no wait, takes three round trips on a Redis that runs Lua:

1. take the user's lock, reading beside it whether the user has sessions, the regions' version
   (``shared.region_readings``) and the oldest ready environments of the likely pool;
2. claim one of them, counting the claim (``pool_claims``);
3. store the session if its id is new, tell the gateways, queue the relabel task and release the
   lock (``user_locks``: the release's batch).

A returning user's sessions, a reading of the regions' counts (at most once a second, or near a
limit), candidates raced away by other claims or another region than the likely one cost one
more each; without Lua (fakeredis) or on a Redis Cluster client, each step is sent on its own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import structlog

from shared.adapters.pool_store import RedisPoolStore
from shared.adapters.rate_limits import CountAlong, RateLimited
from shared.adapters.session_store import RedisSessionStore, SessionNotFound
from shared.adapters.user_locks import ReadAlong, Reader
from shared.domain.lifecycle import Decision, SessionClocks, admit, start_session
from shared.domain.pools.config import PoolKey
from shared.domain.reasons import CloseReason
from shared.domain.regions import RegionHint
from shared.domain.sessions import Session
from shared.jobs import BIND_ENVIRONMENT, PROVISION, TaskQueue
from shared.regions import RegionPicker, pick_region
from shared.session_results import NotQueued, Opened, SessionLimitReached
from shared.warm_claim import claim_warm_environment

log = structlog.get_logger(__name__)

VERSION = "regions_version"
CANDIDATES = "pool_candidates"


class SessionOpener:
    def __init__(
        self,
        *,
        store: RedisSessionStore,
        queue: TaskQueue,
        clock: Callable[[], float],
        pools: RedisPoolStore | None,
        regions: RegionPicker | None,
        max_sessions_per_user: int,
        close: Callable[[str, CloseReason], Session],
        fail_unqueued: Callable[[str], None],
    ) -> None:
        """``close``: closes a replaced session; ``fail_unqueued``: fails a new session whose
        first task could not be queued (``SessionLife``'s operations)."""
        self._store = store
        self._queue = queue
        self._clock = clock
        self._pools = pools
        self._regions = regions
        self._max_sessions = max_sessions_per_user
        self._close = close
        self._fail_unqueued = fail_unqueued

    def open(
        self,
        *,
        user: str,
        template: str,
        clocks: SessionClocks,
        replace: bool,
        hint: RegionHint,
        counting: CountAlong | None = None,
    ) -> Opened:
        """See ``SessionLife.open``."""
        likely = self._regions.likely_region(hint) if self._regions is not None else hint.region
        along = self._reads_along(likely, template)
        once = None if counting is None else functools.partial(_refusing, counting)
        queued = False
        with self._store.user_lock(user, along=along, once=once) as held:
            admission = admit(
                held.sessions,
                template=template,
                region=hint.region,
                max_sessions=self._max_sessions,
                replace_existing=replace,
            )
            if admission.decision is Decision.RECONNECT and admission.session is not None:
                log.info("session.reconnected", session_id=admission.session.id)
                reason = f"reconnected to the user's session in {admission.session.region}"
                return Opened(admission.session, None, reconnected=True, region_reason=reason)
            if admission.decision is Decision.REFUSE:
                raise SessionLimitReached(user, admission.conflicting, self._max_sessions)
            choice = pick_region(
                self._regions,
                hint,
                template=template,
                replacing=admission.to_close,
                version=held.read.get(VERSION),
            )
            for old in admission.to_close:
                try:
                    self._close(old.id, CloseReason.REPLACED)
                except SessionNotFound:
                    continue  # gone meanwhile: nothing to close
            session, token = start_session(
                user=user, template=template, region=choice.region, clocks=clocks, now=self._clock()
            )
            candidates = held.read.get(CANDIDATES) if choice.region == likely else None
            session = self._claim(session, demand=admission.counts_as_demand, candidates=candidates)
            if self._regions is not None:
                self._regions.placed(session)
            self._store.add(session, held=held)
            structlog.contextvars.bind_contextvars(session_id=session.id, template=template)
            first = BIND_ENVIRONMENT if session.warm else PROVISION
            batch = held.lock.batch
            payload = {"session_id": session.id}
            queued = batch is not None and self._queue.queue_on(batch.pipe, first, payload)
        if not queued:
            self._enqueue(first, session)
        log.info(
            "session.created",
            user=user,
            region=session.region,
            region_reason=choice.reason,
            warm=session.warm,
            environment_id=session.environment_id if session.warm else None,
        )
        return Opened(session, token, region_reason=choice.reason)

    def _reads_along(self, likely: str | None, template: str) -> dict[str, ReadAlong]:
        """What the lock's round trip reads besides the user's sessions (from the same Redis:
        tests may keep pools apart)."""
        along: dict[str, ReadAlong] = {}
        client = self._store.client
        regions, pools = self._regions, self._pools
        if regions is not None and regions.keeps_readings and regions.state.client is client:
            along[VERSION] = regions.queue_version
        # The sizing benchmark's in-memory pools have no Redis to read.
        if isinstance(pools, RedisPoolStore) and likely and pools.claims.client is client:
            queue = pools.claims.queue_candidates
            along[CANDIDATES] = functools.partial(queue, key=PoolKey(likely, template))
        return along

    def _claim(self, session: Session, *, demand: bool, candidates: Any) -> Session:
        if self._pools is None:
            return session
        return claim_warm_environment(
            self._pools, session, now=self._clock(), demand=demand, candidates=candidates
        )

    def _enqueue(self, first: str, session: Session) -> None:
        try:
            self._queue.enqueue(first, {"session_id": session.id})
        except Exception as exc:
            # Nothing was created yet: fail without a teardown. A claimed warm environment
            # goes back through the prewarmer's sweep of unbound claims.
            self._fail_unqueued(session.id)
            log.exception("session.enqueue_failed")
            raise NotQueued(str(exc)) from exc


def _refusing(counting: CountAlong, pipe: Any) -> Reader:
    """``counting`` queued on ``pipe``; its reader raises ``RateLimited`` for a refusal."""
    verdict = counting(pipe)

    def read(answers: Iterator[Any]) -> None:
        throttled = verdict(answers)
        if throttled is not None:
            raise RateLimited(throttled)

    return read
