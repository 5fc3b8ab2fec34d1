"""Label and field selectors with the syntax and errors of the Kubernetes API server."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from labvirt.sim.errors import ApiError, bad_request

_KEY = r"(?:[A-Za-z0-9][-A-Za-z0-9_.]*/)?[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?"
_VALUE = r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_KEY_RE = re.compile(_KEY)
_VALUE_RE = re.compile(_VALUE)


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str  # "=", "!=", "in", "notin", "exists", "!"
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        if self.operator == "exists":
            return present
        if self.operator == "!":
            return not present
        if self.operator in ("=", "in"):
            return present and labels[self.key] in self.values
        # "!=" and "notin" match objects without the label, as the API server does.
        return not present or labels[self.key] not in self.values


@dataclass(frozen=True)
class LabelSelector:
    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        labels = labels or {}
        return all(r.matches(labels) for r in self.requirements)


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def done(self) -> bool:
        self.skip_space()
        return self.pos >= len(self.text)

    def peek(self, token: str) -> bool:
        self.skip_space()
        return self.text.startswith(token, self.pos)

    def take(self, token: str) -> bool:
        if self.peek(token):
            self.pos += len(token)
            return True
        return False

    def match(self, pattern: re.Pattern[str]) -> str:
        self.skip_space()
        found = pattern.match(self.text, self.pos)
        if not found:
            return ""
        self.pos = found.end()
        return found.group(0)

    def word(self) -> str:
        self.skip_space()
        start = self.pos
        while self.pos < len(self.text) and (self.text[self.pos].isalnum()):
            self.pos += 1
        return self.text[start : self.pos]


def _invalid_selector(text: str, why: str) -> ApiError:
    return bad_request(f'unable to parse requirement: {why} in selector "{text}"')


def parse_label_selector(text: str | None) -> LabelSelector:
    """Parse ``a=b,c!=d,e in (f,g),h notin (i),j,!k``; raise 400 ``BadRequest`` when malformed."""
    if not text or not text.strip():
        return LabelSelector()
    scanner = _Scanner(text)
    requirements: list[Requirement] = []
    while True:
        negated = scanner.take("!")
        key = scanner.match(_KEY_RE)
        if not key or len(key.rsplit("/", 1)[-1]) > 63:
            raise _invalid_selector(text, "invalid label key")
        if negated:
            requirements.append(Requirement(key, "!"))
        elif scanner.take("=="):
            requirements.append(Requirement(key, "=", frozenset({_value(scanner, text)})))
        elif scanner.take("!="):
            requirements.append(Requirement(key, "!=", frozenset({_value(scanner, text)})))
        elif scanner.take("="):
            requirements.append(Requirement(key, "=", frozenset({_value(scanner, text)})))
        else:
            save = scanner.pos
            op = scanner.word()
            if op in ("in", "notin"):
                requirements.append(Requirement(key, op, _value_set(scanner, text)))
            else:
                scanner.pos = save
                requirements.append(Requirement(key, "exists"))
        if scanner.done():
            break
        if not scanner.take(","):
            raise _invalid_selector(text, "found unexpected token, expected ','")
    return LabelSelector(tuple(requirements))


def _value(scanner: _Scanner, text: str) -> str:
    value = scanner.match(_VALUE_RE)
    if len(value) > 63:
        raise _invalid_selector(text, "label value too long")
    return value


def _value_set(scanner: _Scanner, text: str) -> frozenset[str]:
    if not scanner.take("("):
        raise _invalid_selector(text, "found unexpected token, expected '('")
    values: set[str] = set()
    while True:
        values.add(_value(scanner, text))
        if scanner.take(")"):
            return frozenset(values)
        if not scanner.take(","):
            raise _invalid_selector(text, "found unexpected token, expected ',' or ')'")


FieldGetter = Callable[[dict[str, Any]], str | None]

# Custom resources (and our simplified core resources) allow only these fields.
SUPPORTED_FIELDS: dict[str, FieldGetter] = {
    "metadata.name": lambda obj: obj.get("metadata", {}).get("name"),
    "metadata.namespace": lambda obj: obj.get("metadata", {}).get("namespace"),
}


@dataclass(frozen=True)
class FieldSelector:
    terms: tuple[tuple[str, bool, str], ...] = ()  # (field, equal?, value)
    getters: Mapping[str, FieldGetter] = field(
        default_factory=lambda: SUPPORTED_FIELDS, compare=False, hash=False, repr=False
    )

    def matches(self, obj: dict[str, Any]) -> bool:
        for name, equal, value in self.terms:
            actual = self.getters[name](obj) or ""
            if (actual == value) != equal:
                return False
        return True

    def value_of(self, field: str) -> str | None:
        """The value an equality term pins ``field`` to, if any (lets a list skip a scan)."""
        for name, equal, value in self.terms:
            if name == field and equal:
                return value
        return None


def parse_field_selector(
    text: str | None, supported: Mapping[str, FieldGetter] | None = None
) -> FieldSelector:
    """Parse ``a=b,c==d,e!=f`` over ``supported`` fields (default: name and namespace)."""
    getters = SUPPORTED_FIELDS if supported is None else supported
    if not text or not text.strip():
        return FieldSelector(getters=getters)
    terms: list[tuple[str, bool, str]] = []
    for raw in text.split(","):
        part = raw.strip()
        for op, equal in (("!=", False), ("==", True), ("=", True)):  # noqa: B007 - used after break
            if op in part:
                field, value = (s.strip() for s in part.split(op, 1))
                break
        else:
            raise bad_request(f"invalid selector: '{text}'; can't understand '{part}'")
        if field not in getters:
            raise bad_request(f"field label not supported: {field}")
        terms.append((field, equal, value))
    return FieldSelector(tuple(terms), getters)
