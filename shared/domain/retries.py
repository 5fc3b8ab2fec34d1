"""Second chances: a boot that failed gets one fresh environment, an operator may reopen a
session that failed once its cause is gone, and a provision lost with its worker is asked for
again until the session records its environment created.

Pure rules over ``Session``; ``shared.session_life`` applies them. A fresh environment is a
new environment id (new VMs, new names), so nothing of the failed one is reused; the failed
one is deleted by its id.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Final

from shared.domain.sessions import (
    HISTORY_LIMIT,
    EnvironmentId,
    IllegalTransition,
    Session,
    SessionState,
    Transition,
)

# How many fresh environments a session gets after boot failures before it fails.
MAX_REPLACEMENTS: Final = 1


def may_replace(session: Session, *, now: float, boot_seconds: float) -> bool:
    """Whether a provisioning session whose VM failed to boot should get a fresh environment:
    it has one left, and its startup deadline leaves time for another boot."""
    if session.state is not SessionState.PROVISIONING or session.warm:
        return False
    if session.replacements >= MAX_REPLACEMENTS:
        return False
    deadline = session.startup_expires_at
    return deadline is None or now + boot_seconds < deadline


def with_fresh_environment(
    session: Session, *, environment_id: EnvironmentId, at: float
) -> Session:
    """The provisioning session moved onto a new environment (its VM views start over), whose
    provision is asked for ``at`` that moment."""
    if session.state is not SessionState.PROVISIONING:
        raise IllegalTransition(session.state, SessionState.PROVISIONING)
    return replace(
        session,
        environment_id=environment_id,
        vms=(),
        replacements=session.replacements + 1,
        provision_requested_at=at,
    )


def with_environment_created(session: Session, *, environment_id: EnvironmentId) -> Session:
    """A provision created every object of ``environment_id``: the session stops asking for
    provisions, unless it has moved on to another environment meanwhile (then it is unchanged,
    as it is when it is no longer provisioning or already knew)."""
    if (
        session.state is not SessionState.PROVISIONING
        or session.environment_id != environment_id
        or session.environment_created
    ):
        return session
    return replace(session, created_environment=environment_id)


def reopened(session: Session, *, environment_id: EnvironmentId, at: float) -> Session:
    """A failed session provisioning again, in a fresh environment, with a fresh startup
    deadline (the same span as its first); refused once its lifetime is over."""
    if session.state is not SessionState.FAILED or at >= session.expires_at:
        raise IllegalTransition(session.state, SessionState.PROVISIONING)
    span = (
        None
        if session.startup_expires_at is None
        else session.startup_expires_at - session.created_at
    )
    history = (*session.history, Transition(SessionState.PROVISIONING, at, "reopened"))
    history = history[-HISTORY_LIMIT:]
    return replace(
        session,
        state=SessionState.PROVISIONING,
        environment_id=environment_id,
        vms=(),
        reason=None,
        ended_by=None,
        replacements=0,
        last_seen_at=max(session.last_seen_at, at),
        startup_expires_at=None if span is None else at + span,
        history=history,
        provision_requested_at=at,
    )
