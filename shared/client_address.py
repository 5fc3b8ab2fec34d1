"""Whose request this is: the client's address behind the proxies labvirt trusts.

``X-Forwarded-For`` is a list every proxy appends its peer to, so only its right end is
worth anything: the entries a trusted proxy appended. Walking from the right, each entry is
believed while the hop that wrote it is trusted; the first address that is not a trusted
proxy is the client. From a peer that is not a trusted proxy the header is ignored (anyone
can send one), and a malformed entry ends the walk at the last trusted hop, which is then
the best address known. Pure: the API and the gateway both call it with what they saw.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from shared.config_limits import IpNetwork

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# What a peer without an address (a Unix socket, a test transport) is counted as.
UNKNOWN_PEER = "unknown"


def client_address(
    peer: str | None, forwarded_for: str | None, trusted_proxies: Iterable[IpNetwork]
) -> str:
    """The client's address, normalised (IPv4-mapped IPv6 as IPv4, IPv6 compressed).

    ``forwarded_for``: every ``X-Forwarded-For`` header of the request, joined by commas in
    the order they came.
    """
    networks = tuple(trusted_proxies)
    current = parse_address(peer or "")
    if current is None:
        return (peer or "").strip() or UNKNOWN_PEER
    if not networks or not forwarded_for:
        return str(current)
    for entry in reversed(forwarded_for.split(",")):
        if not _is_trusted(current, networks):
            break
        previous = parse_address(entry)
        if previous is None:
            break
        current = previous
    return str(current)


def parse_address(text: str) -> IpAddress | None:
    """An address as proxies write it: ``1.2.3.4``, ``1.2.3.4:5678``, ``2001:db8::1`` or
    ``[2001:db8::1]:443``; None for anything else (``unknown``, names, garbage)."""
    text = text.strip()
    if text.startswith("["):
        inside, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not _is_port(rest)):
            return None
        text = inside
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
        if not _is_port(":" + port):
            return None
        text = host
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_port(text: str) -> bool:
    return text.startswith(":") and text[1:].isascii() and text[1:].isdigit() and len(text) <= 6


def _is_trusted(address: IpAddress, networks: tuple[IpNetwork, ...]) -> bool:
    return any(address.version == network.version and address in network for network in networks)
