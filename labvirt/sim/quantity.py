"""Kubernetes resource quantities ("128Mi", "1.5G", "500m", "2", 1e3) as exact numbers.

The simulator's scheduler adds and compares memory and CPU the way the kube-scheduler does, so
quantities are parsed into ``Decimal`` (never float) and rounded up to whole bytes or millicores,
as ``resource.Quantity.Value()`` and ``MilliValue()`` do.
"""

from __future__ import annotations

import math
import re
from decimal import Context, Decimal, InvalidOperation

# The grammar of k8s.io/apimachinery/pkg/api/resource: <signedNumber><suffix>, where the suffix
# is a binary SI unit, a decimal SI unit, or an exponent.
QUANTITY_PATTERN = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
_NUMBER = re.compile(r"^[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)$")
_EXPONENT = re.compile(r"^[eE][+-]?[0-9]+$")
_SPLIT = re.compile(r"^([+-]?[0-9.]*)(.*)$", re.DOTALL)

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
}


# Enough digits for any mantissa times 2**60 (and far more than Kubernetes' 2**63 cap).
_EXACT = Context(prec=100)


class QuantityError(ValueError):
    """Raised for text that is not a Kubernetes quantity; the message is the API server's."""

    def __init__(self, value: object) -> None:
        super().__init__(f"quantities must match the regular expression '{QUANTITY_PATTERN}'")
        self.value = value


def parse_quantity(value: str | int | float) -> Decimal:
    """The exact value of a quantity; JSON numbers are accepted as the API server does."""
    if isinstance(value, bool):
        raise QuantityError(value)
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise QuantityError(value)
        return Decimal(repr(value))
    if not isinstance(value, str):
        raise QuantityError(value)
    split = _SPLIT.match(value.strip())
    if split is None:  # pragma: no cover - the pattern matches every string
        raise QuantityError(value)
    number, suffix = split.groups()
    if not _NUMBER.match(number):
        raise QuantityError(value)
    try:
        mantissa = Decimal(number)
    except InvalidOperation as exc:  # pragma: no cover - the regex already vouched for it
        raise QuantityError(value) from exc
    if suffix in _BINARY:
        return _EXACT.multiply(mantissa, _BINARY[suffix])
    if suffix in _DECIMAL:
        return _EXACT.multiply(mantissa, _DECIMAL[suffix])
    if _EXPONENT.match(suffix):
        try:
            return mantissa.scaleb(int(suffix[1:]), _EXACT)
        except ArithmeticError as exc:  # beyond any quantity's range
            raise QuantityError(value) from exc
    raise QuantityError(value)


MAX_VALUE = 2**63 - 1  # larger quantities are capped, as Kubernetes does


def _ceil(value: Decimal) -> int:
    if value >= MAX_VALUE:
        return MAX_VALUE
    if value <= -MAX_VALUE:
        return -MAX_VALUE
    return int(value.to_integral_value(rounding="ROUND_CEILING", context=_EXACT))


def to_bytes(value: str | int | float) -> int:
    """Whole bytes, rounded up (``Quantity.Value()``)."""
    return _ceil(parse_quantity(value))


def to_millicores(value: str | int | float) -> int:
    """Whole millicores, rounded up (``Quantity.MilliValue()``)."""
    return _ceil(_EXACT.multiply(parse_quantity(value), 1000))


def format_bytes(amount: int) -> str:
    """Canonical binary form: the largest binary suffix that keeps an integer ("1536Mi")."""
    if amount == 0:
        return "0"
    for suffix, factor in reversed(_BINARY.items()):
        if amount % factor == 0:
            return f"{amount // factor}{suffix}"
    return str(amount)


def format_millicores(millicores: int) -> str:
    """Canonical CPU form: whole cores when exact ("2"), else millicores ("1500m")."""
    if millicores % 1000 == 0:
        return str(millicores // 1000)
    return f"{millicores}m"
