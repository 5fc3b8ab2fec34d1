"""What a session writes on its cluster objects, so that it can be rebuilt from them alone.

Redis is the source of truth while it lives; when it loses its data, the reconciler rebuilds every
live session from its VMIs: the labels say which session, environment and template, these
annotations say the rest. The token is kept as its hash (what Redis keeps too), so the learner's
session token keeps working after a rebuild. What changes often (the last heartbeat) is not
written: a rebuilt session's idle clock starts at the rebuild.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Final

from shared.domain.manifests import (
    CREATED_AT_ANNOTATION,
    ENVIRONMENT_LABEL,
    SESSION_LABEL,
    TEMPLATE_LABEL,
    format_timestamp,
    is_valid_environment_id,
    parse_timestamp,
)
from shared.domain.sessions import (
    EnvironmentId,
    InvalidUser,
    Session,
    SessionId,
    SessionState,
    Transition,
    VmView,
    check_user,
)

USER_ANNOTATION: Final = "labvirt.io/user"
TOKEN_HASH_ANNOTATION: Final = "labvirt.io/token-hash"  # noqa: S105 - a key, not a secret
EXPIRES_AT_ANNOTATION: Final = "labvirt.io/expires-at"
HARD_EXPIRES_AT_ANNOTATION: Final = "labvirt.io/hard-expires-at"
STARTUP_EXPIRES_AT_ANNOTATION: Final = "labvirt.io/startup-expires-at"
IDLE_TIMEOUT_ANNOTATION: Final = "labvirt.io/idle-timeout-seconds"
EXTEND_STEP_ANNOTATION: Final = "labvirt.io/extend-step-seconds"
WARM_ANNOTATION: Final = "labvirt.io/warm"

RESTORED_REASON: Final = "restored from the cluster"

# The annotations that change during a session's life (an extension moves expires-at).
MUTABLE_ANNOTATIONS: Final = frozenset({EXPIRES_AT_ANNOTATION})

_TOKEN_HASH_LENGTH: Final = 64


def session_annotations(session: Session) -> dict[str, str]:
    """The annotations every VMI of ``session``'s environment carries.

    Deadlines are rounded up to the second (the form Kubernetes writes times in): a rebuilt
    session may live a fraction of a second longer, never shorter.
    """
    annotations = {
        USER_ANNOTATION: session.user,
        TOKEN_HASH_ANNOTATION: session.token_hash,
        CREATED_AT_ANNOTATION: _time(session.created_at, up=False),
        EXPIRES_AT_ANNOTATION: _time(session.expires_at),
        IDLE_TIMEOUT_ANNOTATION: str(session.idle_timeout_seconds),
        EXTEND_STEP_ANNOTATION: str(session.extend_step_seconds),
        WARM_ANNOTATION: "true" if session.warm else "false",
    }
    if session.hard_expires_at is not None:
        annotations[HARD_EXPIRES_AT_ANNOTATION] = _time(session.hard_expires_at)
    if session.startup_expires_at is not None:
        annotations[STARTUP_EXPIRES_AT_ANNOTATION] = _time(session.startup_expires_at)
    return annotations


def stale_annotations(current: Mapping[str, str], session: Session) -> dict[str, str]:
    """The annotations to patch so that an object agrees with ``session`` again (often none)."""
    wanted = session_annotations(session)
    return {
        key: wanted[key]
        for key in MUTABLE_ANNOTATIONS
        if key in wanted and current.get(key) != wanted[key]
    }


def restore_session(
    *,
    labels: Mapping[str, str],
    annotations: Mapping[str, str],
    region: str,
    vms: Sequence[VmView],
    all_ready: bool,
    now: float,
) -> Session | None:
    """The live session an environment's objects describe, or None if they cannot tell.

    None when a label or annotation is missing or malformed (an object written by an older
    labvirt, or edited by hand), and when the session's lifetime is already over: such an
    environment belongs to nobody and the reconciler removes it. The environment token is
    written nowhere on the cluster but in the VMs' user data: the rebuilt session gets a new
    one, which only VMs created after the rebuild carry.
    """
    try:
        session_id = labels[SESSION_LABEL]
        environment_id = labels[ENVIRONMENT_LABEL]
        template = labels[TEMPLATE_LABEL]
        user = check_user(annotations[USER_ANNOTATION])
        token_hash = annotations[TOKEN_HASH_ANNOTATION]
        created_at = _seconds(annotations[CREATED_AT_ANNOTATION])
        expires_at = _seconds(annotations[EXPIRES_AT_ANNOTATION])
        idle_timeout = int(annotations[IDLE_TIMEOUT_ANNOTATION])
        extend_step = int(annotations.get(EXTEND_STEP_ANNOTATION, "0"))
        hard = _optional_seconds(annotations.get(HARD_EXPIRES_AT_ANNOTATION))
        startup = _optional_seconds(annotations.get(STARTUP_EXPIRES_AT_ANNOTATION))
    except (KeyError, ValueError, InvalidUser):
        return None
    if (
        not is_valid_environment_id(environment_id)
        or len(token_hash) != _TOKEN_HASH_LENGTH
        or idle_timeout < 1
        or now >= expires_at
    ):
        return None
    history = [Transition(SessionState.PROVISIONING, created_at)]
    state = SessionState.PROVISIONING
    if all_ready:
        state = SessionState.READY
        history.append(Transition(SessionState.READY, now, RESTORED_REASON))
    return Session(
        id=SessionId(session_id),
        user=user,
        template=template,
        region=region,
        environment_id=EnvironmentId(environment_id),
        token_hash=token_hash,
        created_at=created_at,
        expires_at=expires_at,
        idle_timeout_seconds=idle_timeout,
        last_seen_at=now,
        state=state,
        warm=annotations.get(WARM_ANNOTATION) == "true",
        vms=tuple(vms),
        history=tuple(history),
        hard_expires_at=hard,
        extend_step_seconds=extend_step,
        startup_expires_at=startup,
        # A booting one's provision is asked for again by the reconciler, now.
        provision_requested_at=now,
    )


def _time(seconds: float, *, up: bool = True) -> str:
    whole = math.ceil(seconds) if up else math.floor(seconds)
    return format_timestamp(datetime.fromtimestamp(whole, UTC))


def _seconds(text: str) -> float:
    return parse_timestamp(text).timestamp()


def _optional_seconds(text: str | None) -> float | None:
    return None if text is None else _seconds(text)
