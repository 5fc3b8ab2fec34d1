"""The rules of a session's life on a fake clock: idle, lifetime, extension, hard deadline,
startup timeout, reconnect and replace, warnings, and the record a session leaves on its VMIs."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.domain.lifecycle import (
    ClockOverrides,
    DeadlineKind,
    DeadlinePolicy,
    Decision,
    Effect,
    ExtensionRefused,
    Stage,
    admit,
    clocks_for,
    deadlines,
    extend,
    on_deadline,
    start_session,
    transition_event,
    warning_at,
)
from shared.domain.manifests import ENVIRONMENT_LABEL, SESSION_LABEL, TEMPLATE_LABEL
from shared.domain.recovery import (
    EXPIRES_AT_ANNOTATION,
    RESTORED_REASON,
    restore_session,
    session_annotations,
    stale_annotations,
)
from shared.domain.retries import with_environment_created, with_fresh_environment
from shared.domain.sessions import EnvironmentId, Session, SessionState, VmView
from shared.domain.templates import Template, VmSpec

P, R, T, E, F = (
    SessionState.PROVISIONING,
    SessionState.READY,
    SessionState.TERMINATING,
    SessionState.ENDED,
    SessionState.FAILED,
)
NOW = 1_700_000_000.0
POLICY = DeadlinePolicy(expiry_warning_seconds=60, teardown_retry_seconds=300)

VM = VmSpec(
    name="box", hostname="box", image="img", cpu_cores=1, memory="1Gi", user_data="#cloud-config"
)
TEMPLATE = Template(
    name="box",
    description="",
    vms=(VM,),
    max_lifetime_seconds=3600,
    idle_timeout_seconds=300,
    startup_timeout_seconds=600,
    extend_step_seconds=1800,
    hard_deadline_seconds=7200,
)


class FakeClock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def new(
    clock: FakeClock | None = None,
    *,
    template: Template = TEMPLATE,
    overrides: ClockOverrides | None = None,
    user: str = "alice",
    region: str = "local",
) -> Session:
    at = clock.now if clock else NOW
    session, _ = start_session(
        user=user,
        template=template.name,
        region=region,
        clocks=clocks_for(template, overrides),
        now=at,
    )
    return session


def fire(session: Session, kind: DeadlineKind, now: float) -> tuple[Session, Effect | None]:
    outcome = on_deadline(session, kind, now=now, policy=POLICY)
    return outcome.session, outcome.effect


# -- clocks ----------------------------------------------------------------------------------


def test_a_new_session_starts_every_clock_from_its_template() -> None:
    session = new()

    assert session.expires_at == NOW + 3600
    assert session.idle_expires_at == NOW + 300
    assert session.startup_expires_at == NOW + 600
    assert session.hard_expires_at == NOW + 7200
    assert session.extend_step_seconds == 1800


def test_overrides_replace_the_templates_clocks() -> None:
    overrides = ClockOverrides(
        max_lifetime_seconds=60,
        idle_timeout_seconds=4,
        startup_timeout_seconds=30,
        extend_step_seconds=0,
        hard_deadline_seconds=90,
    )
    clocks = clocks_for(TEMPLATE, overrides)

    assert (
        clocks.max_lifetime_seconds,
        clocks.idle_timeout_seconds,
        clocks.startup_timeout_seconds,
        clocks.extend_step_seconds,
        clocks.hard_deadline_seconds,
    ) == (60, 4, 30, 0, 90)


def test_a_lifetime_override_past_the_hard_deadline_lifts_it() -> None:
    clocks = clocks_for(TEMPLATE, ClockOverrides(max_lifetime_seconds=10_000))

    assert clocks.hard_deadline_seconds == 10_000


# -- idle and lifetime -------------------------------------------------------------------------


def test_idle_ends_a_silent_session_and_a_heartbeat_postpones_it() -> None:
    clock = FakeClock()
    session = new(clock).transition(R, at=clock.advance(20))

    session, effect = fire(session, DeadlineKind.IDLE, clock.advance(279.9))  # NOW + 299.9
    assert (session.state, effect) == (R, None)
    session = session.seen(clock.now)
    session, effect = fire(session, DeadlineKind.IDLE, clock.advance(299))
    assert (session.state, effect) == (R, None)
    session, effect = fire(session, DeadlineKind.IDLE, clock.advance(1))

    assert (session.state, effect) == (T, Effect.TEARDOWN)
    assert session.reason == "idle timeout"
    assert session.teardown_requested_at == clock.now


def test_lifetime_ends_a_session_however_alive_it_is() -> None:
    clock = FakeClock()
    session = new(clock).transition(R, at=NOW)
    for _ in range(12):  # a heartbeat every 5 minutes for an hour
        session = session.seen(clock.advance(299))
    session, effect = fire(session, DeadlineKind.LIFETIME, clock.advance(3600 - 12 * 299))

    assert (session.state, effect) == (T, Effect.TEARDOWN)
    assert session.reason == "maximum lifetime reached"


@pytest.mark.parametrize("kind", [DeadlineKind.IDLE, DeadlineKind.LIFETIME])
@pytest.mark.parametrize("state", [T, E, F])
def test_a_session_no_longer_live_is_left_alone(kind: DeadlineKind, state: SessionState) -> None:
    session = new()
    path = {T: (T,), E: (T, E), F: (F,)}[state]
    for step in path:
        session = session.transition(step, at=NOW)

    after, effect = fire(session, kind, NOW + 100_000)

    assert (after, effect) == (session, None)


# -- extension and the hard deadline ---------------------------------------------------------


def test_extension_moves_the_end_by_one_step_up_to_the_hard_deadline() -> None:
    clock = FakeClock()
    session = new(clock).transition(R, at=NOW)

    session = extend(session, now=clock.advance(1000))
    assert session.expires_at == NOW + 3600 + 1800
    assert session.last_seen_at == clock.now  # an extension is a sign of life
    session = extend(session, now=clock.advance(1000))
    assert session.expires_at == NOW + 7200  # capped: 3600 + 2 * 1800 = 7200 exactly
    with pytest.raises(ExtensionRefused) as refused:
        extend(session, now=clock.advance(1))

    assert refused.value.code == "hard_deadline_reached"


def test_the_last_step_is_cut_at_the_hard_deadline() -> None:
    template = replace(TEMPLATE, extend_step_seconds=2500)
    session = new(template=template)

    session = extend(session, now=NOW + 10)
    assert session.expires_at == NOW + 3600 + 2500
    session = extend(session, now=NOW + 20)

    assert session.expires_at == NOW + 7200


def test_extension_is_refused_when_the_template_allows_none() -> None:
    session = new(overrides=ClockOverrides(extend_step_seconds=0))

    with pytest.raises(ExtensionRefused) as refused:
        extend(session, now=NOW + 10)

    assert refused.value.code == "not_extendable"


def test_extension_is_refused_once_the_session_is_over_or_its_lifetime_passed() -> None:
    session = new()
    with pytest.raises(ExtensionRefused) as late:
        extend(session, now=NOW + 3600)
    with pytest.raises(ExtensionRefused) as closed:
        extend(session.transition(T, at=NOW), now=NOW + 1)

    assert (late.value.code, closed.value.code) == ("session_expired", "session_closed")


def test_an_extended_session_is_not_ended_at_its_old_lifetime() -> None:
    session = extend(new().transition(R, at=NOW), now=NOW + 100)
    session = session.seen(NOW + 3500)

    after, effect = fire(session, DeadlineKind.LIFETIME, NOW + 3600)
    assert (after.state, effect) == (R, None)
    after, effect = fire(after, DeadlineKind.LIFETIME, NOW + 5400)
    assert (after.state, effect) == (T, Effect.TEARDOWN)


@given(
    steps=st.lists(st.integers(min_value=1, max_value=10_000), min_size=1, max_size=30),
    lifetime=st.integers(min_value=1, max_value=50_000),
    hard_extra=st.integers(min_value=0, max_value=50_000),
)
def test_extensions_never_pass_the_hard_deadline_and_never_shorten(
    steps: list[int], lifetime: int, hard_extra: int
) -> None:
    template = replace(
        TEMPLATE, max_lifetime_seconds=lifetime, hard_deadline_seconds=lifetime + hard_extra
    )
    session = new(template=template)
    assert session.hard_expires_at is not None
    for step in steps:
        before = session.expires_at
        stepped = replace(session, extend_step_seconds=step)
        if before >= session.hard_expires_at:
            with pytest.raises(ExtensionRefused, match="hard deadline"):
                extend(stepped, now=NOW)
            continue
        session = extend(stepped, now=NOW)
        assert before < session.expires_at <= session.hard_expires_at


# -- startup timeout -------------------------------------------------------------------------


def test_a_session_still_provisioning_at_its_startup_timeout_fails() -> None:
    session = new()

    early, effect = fire(session, DeadlineKind.STARTUP, NOW + 599)
    assert (early.state, effect) == (P, None)
    failed, effect = fire(session, DeadlineKind.STARTUP, NOW + 600)

    assert (failed.state, effect) == (F, Effect.TEARDOWN)
    assert failed.reason == "environment did not become ready within 600 s (startup timeout)"


def test_startup_is_watched_only_while_provisioning() -> None:
    session = new()
    assert deadlines(session, POLICY)[DeadlineKind.STARTUP] == NOW + 600

    ready = session.transition(R, at=NOW + 30)
    assert DeadlineKind.STARTUP not in deadlines(ready, POLICY)
    after, effect = fire(ready, DeadlineKind.STARTUP, NOW + 600)
    assert (after.state, effect) == (R, None)


# -- what the reaper watches -----------------------------------------------------------------


def test_deadlines_of_each_state() -> None:
    session = new()
    live = deadlines(session, POLICY)
    assert live == {
        DeadlineKind.LIFETIME: NOW + 3600,
        DeadlineKind.IDLE: NOW + 300,
        DeadlineKind.STARTUP: NOW + 600,
        DeadlineKind.PROVISION: NOW + 15,
        DeadlineKind.WARNING: NOW + 300 - 60,
    }
    closing = session.transition(T, at=NOW + 5, reason="closed")
    assert deadlines(closing, POLICY) == {DeadlineKind.TEARDOWN: NOW + 5 + 300}
    assert deadlines(closing.transition(E, at=NOW + 6), POLICY) == {}
    assert deadlines(session.transition(F, at=NOW + 6), POLICY) == {}


def test_a_stuck_teardown_is_asked_for_again_each_retry_interval() -> None:
    closing = new().transition(T, at=NOW, reason="closed")

    _, effect = fire(closing, DeadlineKind.TEARDOWN, NOW + 299)
    assert effect is None
    again, effect = fire(closing, DeadlineKind.TEARDOWN, NOW + 300)
    assert effect is Effect.TEARDOWN
    assert again.state is T
    assert deadlines(again, POLICY) == {DeadlineKind.TEARDOWN: NOW + 600}


def test_a_provision_whose_environment_is_not_created_is_asked_again_once_per_delay() -> None:
    session = new()

    _, effect = fire(session, DeadlineKind.PROVISION, NOW + 14.9)
    assert effect is None
    again, effect = fire(session, DeadlineKind.PROVISION, NOW + 15)
    assert effect is Effect.PROVISION
    assert again.state is P
    assert deadlines(again, POLICY)[DeadlineKind.PROVISION] == NOW + 30
    # A second reaper that read the same due entry finds it moved on: nothing to ask.
    assert fire(again, DeadlineKind.PROVISION, NOW + 15.5) == (again, None)


def test_a_created_environment_or_a_session_past_provisioning_asks_for_no_provision() -> None:
    session = new()
    created = with_environment_created(session, environment_id=session.environment_id)
    assert created.environment_created
    assert DeadlineKind.PROVISION not in deadlines(created, POLICY)
    assert fire(created, DeadlineKind.PROVISION, NOW + 100) == (created, None)
    ready = session.transition(R, at=NOW + 5)
    assert DeadlineKind.PROVISION not in deadlines(ready, POLICY)
    assert fire(ready, DeadlineKind.PROVISION, NOW + 100) == (ready, None)


def test_only_the_sessions_current_environment_counts_as_created() -> None:
    session = new()
    old = session.environment_id
    fresh = with_fresh_environment(session, environment_id=EnvironmentId("fresh00001"), at=NOW + 40)

    # The provision of the failed environment finishing late changes nothing.
    assert with_environment_created(fresh, environment_id=old) is fresh
    assert not fresh.environment_created
    # The fresh environment's provision was just asked for: the delay runs from there.
    assert deadlines(fresh, POLICY)[DeadlineKind.PROVISION] == NOW + 40 + 15
    assert Session.from_dict(fresh.to_dict()) == fresh
    created = with_environment_created(fresh, environment_id=fresh.environment_id)
    assert Session.from_dict(created.to_dict()) == created


def test_the_warning_comes_once_before_whichever_clock_ends_first() -> None:
    session = new().transition(R, at=NOW)
    assert warning_at(session, POLICY) == NOW + 300 - 60  # idle ends first

    warned, effect = fire(session, DeadlineKind.WARNING, NOW + 240)
    assert effect is Effect.WARN
    assert warning_at(warned, POLICY) is None
    assert fire(warned, DeadlineKind.WARNING, NOW + 250)[1] is None
    # A heartbeat moves the idle end, so there is something new to warn about.
    assert warning_at(warned.seen(NOW + 250), POLICY) == NOW + 550 - 60


def test_the_warning_lead_is_at_most_half_the_clock() -> None:
    short = new(overrides=ClockOverrides(idle_timeout_seconds=4))

    assert warning_at(short, POLICY) == NOW + 2
    assert warning_at(short, DeadlinePolicy(expiry_warning_seconds=0)) is None


# -- one session per user: reconnect, refuse, replace ----------------------------------------


def test_a_second_create_for_the_same_template_is_a_reconnect() -> None:
    first = new()

    admission = admit(
        [first], template="box", region="local", max_sessions=1, replace_existing=False
    )

    assert admission.decision is Decision.RECONNECT
    assert admission.session == first


def test_another_template_at_the_limit_is_refused() -> None:
    first = new()

    admission = admit(
        [first], template="other", region="local", max_sessions=1, replace_existing=False
    )

    assert admission.decision is Decision.REFUSE
    assert admission.conflicting == (first,)


def test_replace_closes_every_live_session_and_opens_anew() -> None:
    first = new()
    older = replace(new(), created_at=NOW - 10)
    gone = new().transition(T, at=NOW)

    admission = admit(
        [first, older, gone], template="box", region="local", max_sessions=1, replace_existing=True
    )

    assert admission.decision is Decision.OPEN
    assert admission.to_close == (older, first)


def test_sessions_on_their_way_out_do_not_count() -> None:
    closing = new().transition(T, at=NOW)
    failed = new().transition(F, at=NOW)

    admission = admit(
        [closing, failed], template="box", region="local", max_sessions=1, replace_existing=False
    )

    assert admission.decision is Decision.OPEN


def test_a_higher_limit_admits_other_templates_and_still_reconnects() -> None:
    first = new()

    other = admit([first], template="other", region="local", max_sessions=2, replace_existing=False)
    same = admit([first], template="box", region="local", max_sessions=2, replace_existing=False)
    elsewhere = admit([first], template="box", region="eu", max_sessions=1, replace_existing=False)

    assert other.decision is Decision.OPEN
    assert same.decision is Decision.RECONNECT
    assert elsewhere.decision is Decision.REFUSE


# -- progress events -------------------------------------------------------------------------


def test_each_state_change_maps_to_a_stage() -> None:
    session = new()
    ready = session.transition(R, at=NOW + 3)
    closing = ready.transition(T, at=NOW + 9, reason="idle timeout")

    queued = transition_event(None, session)
    assert queued is not None
    assert (queued.stage, queued.at) == (Stage.QUEUED, NOW)
    became_ready = transition_event(session, ready)
    assert became_ready is not None
    assert became_ready.stage is Stage.READY
    ended = transition_event(ready, closing)
    assert ended is not None
    assert (ended.stage, ended.detail["reason"]) == (Stage.ENDED, "idle timeout")
    assert transition_event(closing, closing.transition(E, at=NOW + 10)) is None
    assert transition_event(ready, ready.seen(NOW + 5)) is None


# -- the session's record on its VMIs --------------------------------------------------------


def labels_of(session: Session) -> dict[str, str]:
    return {
        SESSION_LABEL: session.id,
        ENVIRONMENT_LABEL: session.environment_id,
        TEMPLATE_LABEL: session.template,
    }


def test_a_session_is_restored_from_its_labels_and_annotations() -> None:
    original = new().transition(R, at=NOW + 20)
    vms = (VmView(name="box", hostname="box", ip="10.0.0.2", phase="Running", ready=True),)

    restored = restore_session(
        labels=labels_of(original),
        annotations=session_annotations(original),
        region="local",
        vms=vms,
        all_ready=True,
        now=NOW + 100,
    )

    assert restored is not None
    assert (restored.id, restored.user, restored.template, restored.region) == (
        original.id,
        "alice",
        "box",
        "local",
    )
    assert restored.environment_id == original.environment_id
    assert restored.token_hash == original.token_hash  # the learner's token keeps working
    assert (restored.created_at, restored.expires_at) == (original.created_at, original.expires_at)
    assert restored.hard_expires_at == original.hard_expires_at
    assert restored.idle_timeout_seconds == original.idle_timeout_seconds
    assert restored.last_seen_at == NOW + 100  # the idle clock restarts at the rebuild
    assert restored.state is R
    assert restored.history[-1].reason == RESTORED_REASON
    assert restored.vms == vms


def test_deadlines_on_the_cluster_round_up_to_the_second() -> None:
    original = replace(new(), expires_at=NOW + 3600.2, created_at=NOW + 0.7)

    restored = restore_session(
        labels=labels_of(original),
        annotations=session_annotations(original),
        region="local",
        vms=(),
        all_ready=False,
        now=NOW + 10,
    )

    assert restored is not None
    assert restored.state is P
    assert restored.expires_at == NOW + 3601  # never earlier than Redis said
    assert restored.created_at == NOW


@pytest.mark.parametrize(
    "missing", ["labvirt.io/user", "labvirt.io/token-hash", EXPIRES_AT_ANNOTATION]
)
def test_objects_that_cannot_tell_are_not_restored(missing: str) -> None:
    original = new()
    annotations = session_annotations(original)
    del annotations[missing]

    assert (
        restore_session(
            labels=labels_of(original),
            annotations=annotations,
            region="local",
            vms=(),
            all_ready=False,
            now=NOW,
        )
        is None
    )


def test_a_session_past_its_lifetime_is_not_restored() -> None:
    original = new()

    restored = restore_session(
        labels=labels_of(original),
        annotations=session_annotations(original),
        region="local",
        vms=(),
        all_ready=True,
        now=original.expires_at,
    )

    assert restored is None


def test_an_extension_makes_the_expiry_annotation_stale() -> None:
    original = new()
    annotations = session_annotations(original)
    extended = extend(original, now=NOW + 10)

    assert stale_annotations(annotations, original) == {}
    assert stale_annotations(annotations, extended) == {
        EXPIRES_AT_ANNOTATION: session_annotations(extended)[EXPIRES_AT_ANNOTATION]
    }
