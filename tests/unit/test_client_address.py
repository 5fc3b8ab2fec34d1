"""Whose request it is: the client address behind trusted proxies (``X-Forwarded-For``)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.client_address import UNKNOWN_PEER, client_address, parse_address

PROXIES = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "expected"),
    [
        # No header, or a peer that is not a trusted proxy: the peer, whatever the header says.
        ("203.0.113.5", None, "203.0.113.5"),
        ("203.0.113.5", "198.51.100.7", "203.0.113.5"),
        ("203.0.113.5", "10.0.0.1, 198.51.100.7", "203.0.113.5"),
        # One trusted proxy: the address it appended.
        ("10.0.0.2", "198.51.100.7", "198.51.100.7"),
        # What the client itself sent sits left of what the proxy appended: not believed.
        ("10.0.0.2", "1.1.1.1, 198.51.100.7", "198.51.100.7"),
        # A chain of trusted proxies is walked through to the first untrusted hop.
        ("10.0.0.2", "1.1.1.1, 198.51.100.7, 10.0.0.9, 10.1.2.3", "198.51.100.7"),
        # Every hop trusted: the leftmost is the furthest known.
        ("10.0.0.2", "10.0.0.7, 10.0.0.8", "10.0.0.7"),
        # IPv6 peers, clients and proxies; addresses come out compressed.
        ("fd00::1", "2001:DB8:0:0::7", "2001:db8::7"),
        ("fd00::1", "2001:db8::7, fd00::2", "2001:db8::7"),
        ("2001:db8::9", "198.51.100.7", "2001:db8::9"),
        ("10.0.0.2", "[2001:db8::7]:51234", "2001:db8::7"),
        ("10.0.0.2", "198.51.100.7:51234", "198.51.100.7"),
        # IPv4 seen through an IPv6 socket counts as IPv4 (and so matches IPv4 proxies).
        ("::ffff:10.0.0.2", "198.51.100.7", "198.51.100.7"),
        ("::ffff:203.0.113.5", None, "203.0.113.5"),
        # Malformed entries end the walk at the last trusted hop.
        ("10.0.0.2", "garbage", "10.0.0.2"),
        ("10.0.0.2", "198.51.100.7, unknown", "10.0.0.2"),
        ("10.0.0.2", "198.51.100.7, not-an-ip, 10.0.0.3", "10.0.0.3"),
        ("10.0.0.2", "198.51.100.7, ", "10.0.0.2"),
        ("10.0.0.2", ",,,", "10.0.0.2"),
        ("10.0.0.2", "300.1.1.1", "10.0.0.2"),
        ("10.0.0.2", "[2001:db8::7", "10.0.0.2"),
        ("10.0.0.2", "198.51.100.7:port", "10.0.0.2"),
        ("10.0.0.2", "198.51.100.7:1234567", "10.0.0.2"),
        ("10.0.0.2", "'; DROP TABLE sessions; --", "10.0.0.2"),
        # A peer without an address (a Unix socket) is counted as one unknown client.
        (None, "198.51.100.7", UNKNOWN_PEER),
        ("", None, UNKNOWN_PEER),
    ],
)
def test_client_address(peer: str | None, forwarded_for: str | None, expected: str) -> None:
    assert client_address(peer, forwarded_for, PROXIES) == expected


def test_without_trusted_proxies_the_header_is_never_read() -> None:
    assert client_address("10.0.0.2", "198.51.100.7", ()) == "10.0.0.2"


_ADDRESSES = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)


@given(peer=_ADDRESSES, header=st.text(max_size=200))
def test_an_untrusted_peer_is_the_client_whatever_it_sends(peer: str, header: str) -> None:
    address = parse_address(peer)
    assert address is not None
    if any(address.version == n.version and address in n for n in PROXIES):
        return
    assert client_address(peer, header, PROXIES) == str(address)


@given(
    client=_ADDRESSES,
    spoofed=st.lists(st.one_of(_ADDRESSES, st.text(max_size=20)), max_size=5),
    hops=st.lists(st.ip_addresses(network="10.0.0.0/8").map(str), max_size=4),
)
def test_behind_trusted_proxies_the_client_is_the_address_the_first_proxy_saw(
    client: str, spoofed: list[str], hops: list[str]
) -> None:
    """Whatever the client put in the header, the first trusted proxy's entry decides."""
    parsed = parse_address(client)
    assert parsed is not None
    if any(parsed.version == n.version and parsed in n for n in PROXIES):
        return  # a client inside the proxies' networks is indistinguishable from a proxy
    header = ", ".join([*(s.replace(",", " ") for s in spoofed), client, *hops])
    assert client_address("10.0.0.1", header, PROXIES) == str(parsed)


@given(header=st.text(max_size=500))
def test_any_header_yields_an_address_from_the_header_or_the_peer(header: str) -> None:
    result = client_address("10.0.0.2", header, PROXIES)
    assert parse_address(result) is not None
