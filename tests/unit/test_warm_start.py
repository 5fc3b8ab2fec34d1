"""A session that starts in a warm environment: ready at once, clocks from the claim."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.domain.lifecycle import clocks_for, start_session
from shared.domain.sessions import (
    EnvironmentId,
    IllegalTransition,
    Session,
    SessionState,
    VmView,
)
from shared.domain.templates import Template, VmSpec

NOW = 1_700_000_000.0
VMS = (VmView(name="ubuntu", hostname="ubuntu", ip="10.244.1.2", phase="Running", ready=True),)
TEMPLATE = Template(
    name="ubuntu",
    description="",
    vms=(
        VmSpec(
            name="ubuntu",
            hostname="ubuntu",
            image="quay.io/containerdisks/ubuntu:22.04",
            cpu_cores=1,
            memory="1Gi",
            user_data="#cloud-config\n",
        ),
    ),
    max_lifetime_seconds=3600,
    idle_timeout_seconds=300,
    startup_timeout_seconds=600,
    hard_deadline_seconds=7200,
)


def opened(at: float = NOW) -> Session:
    session, _ = start_session(
        user="alice", template="ubuntu", region="local", clocks=clocks_for(TEMPLATE), now=at
    )
    return session


def test_a_warm_start_is_ready_with_the_pools_environment_and_vms() -> None:
    session = opened()
    warm = session.warm_start(environment_id=EnvironmentId("abc123"), vms=VMS, at=NOW)
    assert (warm.state, warm.warm, warm.environment_id, warm.vms) == (
        SessionState.READY,
        True,
        "abc123",
        VMS,
    )
    assert [t.state for t in warm.history] == [SessionState.PROVISIONING, SessionState.READY]
    assert warm.reason is None
    assert (warm.id, warm.user, warm.token_hash) == (session.id, session.user, session.token_hash)


@given(st.floats(0, 600))
def test_every_clock_counts_from_the_claim(delay: float) -> None:
    session = opened()
    claimed_at = NOW + delay
    warm = session.warm_start(environment_id=EnvironmentId("abc123"), vms=VMS, at=claimed_at)
    assert warm.created_at == claimed_at
    assert warm.expires_at == pytest.approx(claimed_at + 3600)
    assert warm.idle_expires_at == pytest.approx(claimed_at + 300)
    assert warm.hard_expires_at == pytest.approx(claimed_at + 7200)
    assert all(t.at == claimed_at for t in warm.history)


@pytest.mark.parametrize(
    "state", [SessionState.READY, SessionState.TERMINATING, SessionState.ENDED, SessionState.FAILED]
)
def test_only_a_new_session_starts_warm(state: SessionState) -> None:
    with pytest.raises(IllegalTransition):
        replace(opened(), state=state).warm_start(
            environment_id=EnvironmentId("abc123"), vms=VMS, at=NOW
        )


def test_a_warm_session_survives_its_wire_form() -> None:
    warm = opened().warm_start(environment_id=EnvironmentId("abc123"), vms=VMS, at=NOW + 1)
    assert Session.from_dict(warm.to_dict()) == warm
