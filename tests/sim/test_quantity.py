"""Kubernetes quantities: exact parsing, rounding up, canonical formatting."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from labvirt.sim.quantity import (
    QuantityError,
    format_bytes,
    format_millicores,
    parse_quantity,
    to_bytes,
    to_millicores,
)

BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
CAP = 2**63 - 1  # Kubernetes caps quantities here
DECIMAL = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("128Mi", Decimal(128 * 2**20)),
        ("1.5Gi", Decimal(3 * 2**29)),
        ("64Gi", Decimal(64 * 2**30)),
        ("1G", Decimal(10**9)),
        ("1024M", Decimal(1024 * 10**6)),
        ("1k", Decimal(1000)),
        ("500m", Decimal("0.5")),
        ("2", Decimal(2)),
        ("0", Decimal(0)),
        (".5", Decimal("0.5")),
        ("1.", Decimal(1)),
        ("+1Ki", Decimal(1024)),
        ("-1Ki", Decimal(-1024)),
        ("1e3", Decimal(1000)),
        ("1E3", Decimal(1000)),
        ("2e-3", Decimal("0.002")),
        ("1e+2", Decimal(100)),
        ("100n", Decimal("1e-7")),
        ("5u", Decimal("5e-6")),
        (" 1Gi ", Decimal(2**30)),
        (3, Decimal(3)),
        (2.5, Decimal("2.5")),
    ],
)
def test_parse_quantity(text: str | int | float, expected: Decimal) -> None:
    assert parse_quantity(text) == expected


@pytest.mark.parametrize(
    "text", ["", "abc", "Mi", "1.2.3", "1e", "1Kix", "1ki", "1 Gi", "1gi", "--1", "1e1.5", "0x10"]
)
def test_malformed_quantities_are_rejected(text: str) -> None:
    with pytest.raises(QuantityError, match="quantities must match the regular expression"):
        parse_quantity(text)


@pytest.mark.parametrize("value", [None, True, [], {}, float("nan"), float("inf")])
def test_non_quantity_values_are_rejected(value: object) -> None:
    with pytest.raises(QuantityError):
        parse_quantity(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "size"),
    [("1.5", 2), ("500m", 1), ("1Ki", 1024), ("0.1Ki", 103), ("1", 1), ("1e-9", 1)],
)
def test_bytes_round_up_like_quantity_value(text: str, size: int) -> None:
    assert to_bytes(text) == size


@pytest.mark.parametrize(
    ("text", "millicores"),
    [
        ("2", 2000),
        ("500m", 500),
        ("0.1", 100),
        ("1.5", 1500),
        ("0.0001", 1),
        ("250m", 250),
        (4, 4000),
    ],
)
def test_cpu_in_millicores(text: str | int, millicores: int) -> None:
    assert to_millicores(text) == millicores


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0"), (1024, "1Ki"), (1536 * 2**20, "1536Mi"), (64 * 2**30, "64Gi"), (1000, "1000")],
)
def test_format_bytes_is_canonical(size: int, text: str) -> None:
    assert format_bytes(size) == text


@pytest.mark.parametrize(
    ("millicores", "text"), [(0, "0"), (16000, "16"), (1500, "1500m"), (100, "100m")]
)
def test_format_millicores_is_canonical(millicores: int, text: str) -> None:
    assert format_millicores(millicores) == text


@given(st.integers(min_value=0, max_value=2**40), st.sampled_from(sorted(BINARY)))
def test_binary_suffixes_multiply_exactly(number: int, suffix: str) -> None:
    assert to_bytes(f"{number}{suffix}") == min(number * BINARY[suffix], CAP)


@given(st.integers(min_value=0, max_value=2**40), st.sampled_from(sorted(DECIMAL)))
def test_decimal_suffixes_multiply_exactly(number: int, suffix: str) -> None:
    assert to_bytes(f"{number}{suffix}") == min(number * DECIMAL[suffix], CAP)


@given(st.integers(min_value=0, max_value=10**6), st.integers(min_value=0, max_value=12))
def test_exponents_match_decimal_suffixes(mantissa: int, exponent: int) -> None:
    assert to_bytes(f"{mantissa}e{exponent}") == mantissa * 10**exponent


@given(st.integers(min_value=0, max_value=2**62))
def test_format_bytes_round_trips(size: int) -> None:
    assert to_bytes(format_bytes(size)) == size  # below the cap: exact


@given(st.integers(min_value=0, max_value=10**9))
def test_format_millicores_round_trips(millicores: int) -> None:
    assert to_millicores(format_millicores(millicores)) == millicores


@given(st.decimals(min_value=0, max_value=10**6, places=3, allow_nan=False, allow_infinity=False))
def test_plain_decimals_parse_exactly(value: Decimal) -> None:
    text = format(value, "f")
    assert parse_quantity(text) == value
    assert to_millicores(text) == int(value * 1000)


def test_huge_quantities_are_capped_like_kubernetes() -> None:
    assert to_bytes("1e30") == CAP
    assert to_millicores("1E") == CAP
    with pytest.raises(QuantityError):
        to_bytes("1e99999999")
