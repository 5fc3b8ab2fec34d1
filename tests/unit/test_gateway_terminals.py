"""``GET /v1/sessions/{id}/terminal?vm=&ticket=`` at the gateway: everything decided before the
websocket upgrade (who, which VM, whether the session serves). The console bridge itself is
tested end to end against the simulator (tests/e2e/test_terminals_e2e.py)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from shared.adapters.tickets import PREFIX as TICKET_PREFIX
from shared.domain.lifecycle import start_session
from tests.conftest import flush_database
from tests.unit.test_gateway_events import (
    CLOCKS,
    KUBECONFIG,
    NOW,
    VMS,
    Answer,
    Env,
    Http,
    bearer,
    fetch,
)


@pytest.fixture
def env(redis_url: str, tmp_path: Path) -> Iterator[Env]:
    flush_database(redis_url)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(KUBECONFIG)
    made = Env(redis_url, kubeconfig)
    yield made
    made.redis.close()
    flush_database(redis_url)


def terminal_url(session_id: str, **query: str) -> str:
    url = f"/v1/sessions/{session_id}/terminal"
    if query:
        url += "?" + "&".join(f"{k}={v}" for k, v in query.items())
    return url


def ready_session(env: Env, *, user: str = "alice") -> tuple[str, str]:
    session_id, token = env.open_session(user=user)
    env.mark_ready(session_id)
    return session_id, token


def get(env: Env, url: str, headers: dict[str, str] | None = None) -> Answer:
    return env.serve(lambda http: fetch(http, url, headers))


def ticket_alive(env: Env, ticket: str) -> bool:
    key = f"{TICKET_PREFIX}:{hashlib.sha256(ticket.encode()).hexdigest()}"
    return bool(env.redis.exists(key))


def assert_untouched(env: Env, session_id: str) -> None:
    """A refused terminal never counted as a connection of the session."""
    assert env.sweeper.connected(session_id) == 0
    assert env.sweeper.disconnected_since(session_id) is None


def test_a_session_token_in_the_url_is_400_and_leaves_the_ticket_alone(env: Env) -> None:
    session_id, token = ready_session(env)
    ticket = env.ticket(session_id)

    answer = get(env, terminal_url(session_id, vm="ubuntu", token=token, ticket=ticket))

    assert answer.status == 400
    assert answer.error()["code"] == "token_in_url"
    assert answer.headers["Cache-Control"] == "no-store"
    assert ticket_alive(env, ticket)
    assert_untouched(env, session_id)


@pytest.mark.parametrize("with_token", [False, True], ids=["nothing", "token-in-header"])
def test_without_a_ticket_it_is_401_even_with_a_token_in_the_header(
    env: Env, with_token: bool
) -> None:
    session_id, token = ready_session(env)

    answer = get(env, terminal_url(session_id, vm="ubuntu"), bearer(token) if with_token else {})

    assert answer.status == 401
    assert answer.error()["code"] == "unauthorized"
    assert_untouched(env, session_id)


def test_the_websocket_handshake_is_refused_before_the_upgrade(env: Env) -> None:
    session_id, _ = ready_session(env)

    async def scenario(http: Http) -> int:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(terminal_url(session_id, vm="ubuntu"))
        return refused.value.status

    assert env.serve(scenario) == 401


def test_a_used_ticket_is_401(env: Env) -> None:
    session_id, _ = ready_session(env)
    ticket = env.ticket(session_id)
    # The ticket is spent on something that fails after it was redeemed (an unknown VM).
    first = get(env, terminal_url(session_id, vm="nope", ticket=ticket))
    assert first.status == 404

    answer = get(env, terminal_url(session_id, vm="ubuntu", ticket=ticket))

    assert answer.status == 401
    assert answer.error()["code"] == "invalid_ticket"
    assert_untouched(env, session_id)


@pytest.mark.parametrize("ticket", ["forged", "x" * 200])
def test_an_unknown_ticket_is_401(env: Env, ticket: str) -> None:
    session_id, _ = ready_session(env)

    answer = get(env, terminal_url(session_id, vm="ubuntu", ticket=ticket))

    assert answer.status == 401
    assert answer.error()["code"] == "invalid_ticket"


@pytest.mark.parametrize("vm", ["controlplane", "", "../ubuntu"])
def test_an_unknown_vm_is_404_listing_the_sessions_vms(env: Env, vm: str) -> None:
    session_id, _ = ready_session(env)

    answer = get(env, terminal_url(session_id, vm=vm, ticket=env.ticket(session_id)))

    assert answer.status == 404
    error = answer.error()
    assert error["code"] == "no_such_vm"
    assert error["vms"] == ["ubuntu"]
    assert_untouched(env, session_id)


def test_no_vm_at_all_is_404_too(env: Env) -> None:
    session_id, _ = ready_session(env)

    answer = get(env, terminal_url(session_id, ticket=env.ticket(session_id)))

    assert answer.status == 404
    assert answer.error()["code"] == "no_such_vm"


def test_a_booting_session_is_409(env: Env) -> None:
    session_id, _ = env.open_session()
    env.store.update(session_id, lambda s: s.with_vms(VMS))  # listed, not ready yet

    answer = get(env, terminal_url(session_id, vm="ubuntu", ticket=env.ticket(session_id)))

    assert answer.status == 409
    error = answer.error()
    assert error["code"] == "session_not_ready"
    assert "provisioning" in error["detail"]
    assert_untouched(env, session_id)


def test_a_closed_session_is_409(env: Env) -> None:
    session_id, _ = ready_session(env)
    env.close(session_id)

    answer = get(env, terminal_url(session_id, vm="ubuntu", ticket=env.ticket(session_id)))

    assert answer.status == 409
    assert answer.error()["code"] == "session_not_ready"
    assert "terminating" in answer.error()["detail"]


def test_a_ticket_for_session_a_on_session_bs_url_is_401_and_spent(env: Env) -> None:
    session_a, _ = ready_session(env, user="alice")
    session_b, _ = ready_session(env, user="bob")
    tickets_a = env.ticket(session_a)

    async def scenario(http: Http) -> tuple[Answer, Answer]:
        on_b = await fetch(http, terminal_url(session_b, vm="ubuntu", ticket=tickets_a))
        # Spent: a second try on its own session fails before any upgrade as well.
        on_a = await fetch(http, terminal_url(session_a, vm="ubuntu", ticket=tickets_a))
        return on_b, on_a

    on_b, on_a = env.serve(scenario)

    assert on_b.status == 401
    assert on_b.error()["code"] == "invalid_ticket"
    assert on_a.status == 401
    assert not ticket_alive(env, tickets_a)
    assert_untouched(env, session_a)
    assert_untouched(env, session_b)


def test_a_ticket_of_a_session_that_is_gone_is_404(env: Env) -> None:
    absent = "s-" + "0" * 24

    answer = get(env, terminal_url(absent, vm="ubuntu", ticket=env.ticket(absent)))

    assert answer.status == 404
    assert answer.error()["code"] == "not_found"


def test_a_session_in_a_region_no_cluster_serves_is_503(env: Env) -> None:
    session, _ = start_session(
        user="alice", template="ubuntu", region="elsewhere", clocks=CLOCKS, now=NOW
    )
    env.store.add(session)
    env.mark_ready(session.id)

    answer = get(env, terminal_url(session.id, vm="ubuntu", ticket=env.ticket(session.id)))

    assert answer.status == 503
    assert answer.error()["code"] == "region_unavailable"
    assert_untouched(env, session.id)
