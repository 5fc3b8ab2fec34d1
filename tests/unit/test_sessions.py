"""The session's life: its state machine, tokens, user ids, deadlines and wire form."""

from __future__ import annotations

import itertools
import json
import re
import string
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.api.schemas import OpenedSessionAnswer
from shared.domain.recovery import session_annotations
from shared.domain.sessions import (
    FINAL_STATES,
    HISTORY_LIMIT,
    EnvironmentId,
    IllegalTransition,
    InvalidUser,
    Session,
    SessionId,
    SessionState,
    Transition,
    VmView,
    check_user,
    hash_token,
    open_session,
)
from shared.domain.user_data import KUBEADM_TOKEN, legacy_environment_token
from shared.session_results import Opened

P, R, T, E, F = (
    SessionState.PROVISIONING,
    SessionState.READY,
    SessionState.TERMINATING,
    SessionState.ENDED,
    SessionState.FAILED,
)
# The life of a session, written out independently of the module's own table.
LEGAL = {(P, R), (P, T), (P, F), (R, T), (R, F), (T, E), (T, F)}
ALL_PAIRS = list(itertools.product(SessionState, SessionState))
NOW = 1_700_000_000.0


def session_in(state: SessionState, **changes: object) -> Session:
    session, _ = open_session(
        user="alice",
        template="ubuntu",
        region="local",
        max_lifetime_seconds=7200,
        idle_timeout_seconds=300,
        now=NOW,
    )
    return replace(session, state=state, **changes)


# -- state machine ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "wanted"),
    [pair for pair in ALL_PAIRS if pair in LEGAL],
    ids=str,
)
def test_legal_transition(current: SessionState, wanted: SessionState) -> None:
    before = session_in(current)

    after = before.transition(wanted, at=NOW + 5, reason="because")

    assert after.state is wanted
    assert after.history == (*before.history, Transition(wanted, NOW + 5, "because"))
    assert after.reason == "because"
    assert before.state is current  # frozen: the old value is untouched
    assert after.is_final == (wanted in FINAL_STATES)


@pytest.mark.parametrize(
    ("current", "wanted"),
    [pair for pair in ALL_PAIRS if pair not in LEGAL],
    ids=str,
)
def test_illegal_transition(current: SessionState, wanted: SessionState) -> None:
    before = session_in(current)

    with pytest.raises(IllegalTransition) as caught:
        before.transition(wanted, at=NOW + 5)

    assert caught.value.current is current
    assert caught.value.wanted is wanted
    assert str(caught.value) == f"a {current} session cannot become {wanted}"


def test_the_table_covers_every_pair_once() -> None:
    assert len(ALL_PAIRS) == len(SessionState) ** 2 == 25
    assert len(LEGAL) == 7


def test_final_states_allow_nothing() -> None:
    for final in FINAL_STATES:
        for wanted in SessionState:
            with pytest.raises(IllegalTransition):
                session_in(final).transition(wanted, at=NOW)


def test_a_whole_life_is_recorded_in_order() -> None:
    session = session_in(P)
    session = session.transition(R, at=NOW + 60)
    session = session.transition(T, at=NOW + 600, reason="idle timeout")
    session = session.transition(E, at=NOW + 630)

    assert [(t.state, t.at, t.reason) for t in session.history] == [
        (P, NOW, None),
        (R, NOW + 60, None),
        (T, NOW + 600, "idle timeout"),
        (E, NOW + 630, None),
    ]
    assert session.is_final


def test_reason_is_kept_until_a_new_one_is_given() -> None:
    session = session_in(P).transition(T, at=NOW, reason="deleted")

    ended = session.transition(E, at=NOW + 1)
    assert ended.reason == "deleted"
    assert ended.history[-1].reason is None  # the transition itself had none

    failed = session.transition(F, at=NOW + 1, reason="teardown timed out")
    assert failed.reason == "teardown timed out"


def test_history_is_capped_to_the_newest_entries() -> None:
    long_history = tuple(Transition(P, NOW + i) for i in range(HISTORY_LIMIT + 5))
    session = session_in(P, history=long_history)

    after = session.transition(R, at=NOW + 1000)

    assert len(after.history) == HISTORY_LIMIT
    assert after.history[-1] == Transition(R, NOW + 1000)
    assert after.history[:-1] == long_history[-(HISTORY_LIMIT - 1) :]


def test_history_at_the_limit_drops_exactly_one() -> None:
    history = tuple(Transition(P, NOW + i) for i in range(HISTORY_LIMIT))

    after = session_in(P, history=history).transition(R, at=NOW + 1000)

    assert after.history == (*history[1:], Transition(R, NOW + 1000))


# -- open_session, ids and tokens ------------------------------------------------------------


def test_open_session_starts_provisioning_with_its_deadlines() -> None:
    session, token = open_session(
        user="alice",
        template="ubuntu",
        region="eu",
        max_lifetime_seconds=7200,
        idle_timeout_seconds=300,
        now=NOW,
    )

    assert session.state is P
    assert session.user == "alice"
    assert session.template == "ubuntu"
    assert session.region == "eu"
    assert session.created_at == session.last_seen_at == NOW
    assert session.expires_at == NOW + 7200
    assert session.idle_expires_at == NOW + 300
    assert session.history == (Transition(P, NOW),)
    assert session.reason is None
    assert session.vms == ()
    assert not session.warm
    # The API's routes accept only this shape; manifests need a short DNS-friendly id.
    assert re.fullmatch(r"s-[0-9a-f]{24}", session.id)
    assert re.fullmatch(r"[0-9a-f]{10}", session.environment_id)
    assert len(token) >= 32


def test_open_session_refuses_a_bad_user() -> None:
    with pytest.raises(InvalidUser):
        open_session(
            user="not a user",
            template="ubuntu",
            region="eu",
            max_lifetime_seconds=1,
            idle_timeout_seconds=1,
            now=NOW,
        )


def test_ids_and_tokens_are_fresh_each_time() -> None:
    opened = [session_in(P) for _ in range(20)]
    tokens = [
        open_session(
            user="u",
            template="t",
            region="r",
            max_lifetime_seconds=1,
            idle_timeout_seconds=1,
            now=NOW,
        )[1]
        for _ in range(20)
    ]

    assert len({s.id for s in opened}) == 20
    assert len({s.environment_id for s in opened}) == 20
    assert len(set(tokens)) == 20


def test_only_the_hash_of_the_token_is_kept() -> None:
    session, token = open_session(
        user="alice",
        template="ubuntu",
        region="eu",
        max_lifetime_seconds=1,
        idle_timeout_seconds=1,
        now=NOW,
    )

    assert session.token_hash == hash_token(token)
    assert re.fullmatch(r"[0-9a-f]{64}", session.token_hash)
    assert token not in json.dumps(session.to_dict())


def test_token_matches_only_its_own_token() -> None:
    session, token = open_session(
        user="alice",
        template="ubuntu",
        region="eu",
        max_lifetime_seconds=1,
        idle_timeout_seconds=1,
        now=NOW,
    )
    other, other_token = open_session(
        user="alice",
        template="ubuntu",
        region="eu",
        max_lifetime_seconds=1,
        idle_timeout_seconds=1,
        now=NOW,
    )

    assert session.token_matches(token)
    assert other.token_matches(other_token)
    assert not session.token_matches(other_token)
    assert not session.token_matches("")
    assert not session.token_matches(token + "x")
    assert not session.token_matches(session.token_hash)  # the hash is no credential
    assert not session.token_matches("tökén with ünïcode")


@given(st.text(), st.text())
def test_hash_token_is_deterministic_and_distinguishes(a: str, b: str) -> None:
    assert hash_token(a) == hash_token(a)
    assert (hash_token(a) == hash_token(b)) == (a == b)


# -- users -----------------------------------------------------------------------------------

_FIRST = set(string.ascii_letters + string.digits)
_REST = _FIRST | set("_.@+-")


def reference_user_ok(user: str) -> bool:
    return 1 <= len(user) <= 128 and user[0] in _FIRST and set(user[1:]) <= _REST


@pytest.mark.parametrize(
    "user",
    ["alice", "a", "7", "Alice.Smith+lab@example.com", "u_1-2", "a" * 128, "A" + "-" * 127],
)
def test_check_user_accepts(user: str) -> None:
    assert check_user(user) == user


@pytest.mark.parametrize(
    "user",
    [
        "",
        " alice",
        "alice ",
        "-alice",
        ".alice",
        "_alice",
        "@alice",
        "a b",
        "a/b",
        "a:b",
        "a*",
        "alice\n",  # a trailing newline must not slip past the end anchor
        "alice\r\n",
        "ali\nce",
        "a" * 129,
        "ünïcode",
        "ａlice",  # noqa: RUF001 - a full-width look-alike
    ],
)
def test_check_user_rejects(user: str) -> None:
    with pytest.raises(InvalidUser, match="user must be 1-128 characters"):
        check_user(user)


@given(st.text(max_size=140) | st.text(alphabet=sorted(_REST | {"\n", " "}), max_size=140))
def test_check_user_agrees_with_the_documented_rule(user: str) -> None:
    if reference_user_ok(user):
        assert check_user(user) == user
    else:
        with pytest.raises(InvalidUser):
            check_user(user)


# -- wire form -------------------------------------------------------------------------------

finite = st.floats(allow_nan=False, allow_infinity=False)
short_text = st.text(max_size=20)
vm_views = st.builds(
    VmView,
    name=short_text,
    hostname=short_text,
    ip=st.none() | short_text,
    phase=short_text,
    ready=st.booleans(),
)
transitions = st.builds(
    Transition, state=st.sampled_from(SessionState), at=finite, reason=st.none() | short_text
)
sessions = st.builds(
    Session,
    id=short_text.map(SessionId),
    user=short_text,
    template=short_text,
    region=short_text,
    environment_id=short_text.map(EnvironmentId),
    token_hash=short_text,
    created_at=finite,
    expires_at=finite,
    idle_timeout_seconds=st.integers(min_value=0, max_value=10**9),
    last_seen_at=finite,
    state=st.sampled_from(SessionState),
    warm=st.booleans(),
    reason=st.none() | short_text,
    vms=st.lists(vm_views, max_size=3).map(tuple),
    history=st.lists(transitions, max_size=HISTORY_LIMIT).map(tuple),
    hard_expires_at=st.none() | finite,
    extend_step_seconds=st.integers(min_value=0, max_value=10**9),
    startup_expires_at=st.none() | finite,
    warned_for=st.none() | finite,
    teardown_requested_at=st.none() | finite,
)


@given(sessions)
def test_to_dict_from_dict_round_trip(session: Session) -> None:
    assert Session.from_dict(session.to_dict()) == session


@given(sessions)
def test_round_trip_survives_json(session: Session) -> None:
    """The store keeps sessions as JSON: that trip must be lossless too."""
    assert Session.from_dict(json.loads(json.dumps(session.to_dict()))) == session


def test_from_dict_fills_optional_fields() -> None:
    data = session_in(R).to_dict()
    for optional in ("warm", "reason", "vms", "history"):
        del data[optional]

    session = Session.from_dict(data)

    assert session.state is R
    assert (session.warm, session.reason, session.vms, session.history) == (False, None, (), ())


def test_with_vms_replaces_the_view() -> None:
    vm = VmView(name="ubuntu", hostname="ubuntu", ip="10.0.0.7", phase="Running", ready=True)

    session = session_in(R).with_vms([vm])

    assert session.vms == (vm,)
    assert VmView.from_dict(vm.to_dict()) == vm
    assert VmView.from_dict({"name": "n", "hostname": "h"}) == VmView("n", "h")


# -- deadlines -------------------------------------------------------------------------------


@given(
    start=st.floats(min_value=0, max_value=4e9),
    idle=st.integers(min_value=1, max_value=86_400),
    beats=st.lists(st.floats(min_value=0, max_value=4e9), max_size=20),
)
def test_heartbeats_never_move_the_idle_deadline_backwards(
    start: float, idle: int, beats: list[float]
) -> None:
    session = session_in(R, last_seen_at=start, idle_timeout_seconds=idle)
    deadlines = [session.idle_expires_at]
    for at in beats:
        session = session.seen(at)
        deadlines.append(session.idle_expires_at)

    assert deadlines == sorted(deadlines)
    assert session.last_seen_at == max([start, *beats])
    assert session.idle_expires_at == session.last_seen_at + idle


@given(
    start=st.floats(min_value=0, max_value=4e9),
    at=st.floats(min_value=0, max_value=4e9),
)
def test_seen_changes_nothing_but_last_seen(start: float, at: float) -> None:
    before = session_in(R, last_seen_at=start)

    after = before.seen(at)

    assert after.last_seen_at >= before.last_seen_at
    assert replace(after, last_seen_at=before.last_seen_at) == before
    assert after.expires_at == before.expires_at  # a heartbeat never extends the lifetime


# -- the environment token -------------------------------------------------------------------


def test_each_session_gets_its_own_random_kubeadm_token() -> None:
    opened = [session_in(P) for _ in range(50)]

    tokens = {session.environment_token for session in opened}

    assert len(tokens) == 50
    assert all(KUBEADM_TOKEN.fullmatch(token) for token in tokens)
    # Random, not derived from what the session stores elsewhere (as it once was).
    for session in opened:
        legacy = legacy_environment_token(session.token_hash, session.environment_id)
        assert session.environment_token != legacy


def test_the_environment_token_is_kept_with_the_session_and_nowhere_else() -> None:
    session = session_in(R)

    stored = Session.from_dict(json.loads(json.dumps(session.to_dict())))

    assert stored.environment_token == session.environment_token
    assert session.environment_token not in repr(session)  # logs
    assert session.environment_token not in json.dumps(session_annotations(session))
    answer = OpenedSessionAnswer().dump(Opened(session, token="t"))
    assert session.environment_token not in json.dumps(answer)


def test_a_session_stored_before_the_token_keeps_the_token_its_vms_carry() -> None:
    data = session_in(P).to_dict()
    del data["environment_token"]

    session = Session.from_dict(data)

    # What labvirt derived for it then: a retried provision renders the same manifests.
    assert session.environment_token == legacy_environment_token(
        data["token_hash"], data["environment_id"]
    )
    assert KUBEADM_TOKEN.fullmatch(session.environment_token)
