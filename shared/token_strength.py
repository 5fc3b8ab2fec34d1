"""Whether a configured platform token is strong enough to guard the API.

A frontend or admin token opens every session of every learner, so a process refuses to start
with one that is a known placeholder or that an attacker could guess. The rule (the README's
configuration section states it too):

- a placeholder is refused: one character repeated; a token that starts like the examples
  people paste (``replace-with-...``, ``changeme...``, ``example...``, ``<...>``, ``${...}``);
  or one made only of common words (``secret``, ``password``, ``token``, ``your``...) with
  separators and trailing digits (``my-secret-token-2024``, ``your-token-here``);
- otherwise its entropy is estimated, and under ``MIN_TOKEN_BITS`` (128) it is refused. Each
  character is worth log2 of the number of characters in the classes the token uses
  (lowercase 26, uppercase 26, digits 10, anything else 33), except that a common word counts
  ``WORD_BITS`` as a whole, and a character that carries on a run (``aaa``, ``123``, ``cba``)
  or repeats the few characters before it (``abcabc``) from its third step on counts 1 bit.

``secrets.token_hex(16)`` (about 165 bits by this estimate), ``secrets.token_urlsafe(32)``
(about 260) and ``openssl rand -hex 32`` pass; ``e2e-frontend-token-0123456789`` (about 73)
does not. The estimate is generous to long random-looking strings and strict with words and
patterns, which is what hand-made tokens are made of.
"""

from __future__ import annotations

import math
import re
import string
from typing import Final

MIN_TOKEN_BITS: Final = 128
WORD_BITS: Final = 8.0
# A repeat of up to this many characters before (``abcabc``, ``a1a1``) is a pattern.
_LONGEST_REPEATED_CHUNK: Final = 8
_PATTERN_STEPS: Final = 3
_CLASSES: Final = (
    (frozenset(string.ascii_lowercase), 26),
    (frozenset(string.ascii_uppercase), 26),
    (frozenset(string.digits), 10),
)
_OTHER_CLASS_SIZE: Final = 33  # printable ASCII punctuation and the space
COMMON_WORDS: Final = (
    "access",
    "admin",
    "api",
    "auth",
    "change",
    "default",
    "demo",
    "dev",
    "dummy",
    "example",
    "fake",
    "frontend",
    "here",
    "key",
    "labvirt",
    "letmein",
    "long",
    "me",
    "my",
    "pass",
    "password",
    "placeholder",
    "please",
    "prod",
    "production",
    "qwerty",
    "random",
    "replace",
    "sample",
    "secret",
    "string",
    "test",
    "the",
    "this",
    "token",
    "value",
    "with",
    "your",
    "a",
)
# Six letters or more: a random token starts with one of these once in billions.
_PLACEHOLDER_STARTS: Final = (
    "replacewith",
    "changeme",
    "changethis",
    "example",
    "placeholder",
    "insert",
)
_TEMPLATE_MARKERS: Final = ("<", "${", "{{")
# Longest words first, so that ``password`` is one word rather than ``pass`` and the rest.
_WORDS: Final = re.compile("|".join(sorted(COMMON_WORDS, key=len, reverse=True)))
_ONLY_WORDS: Final = re.compile(f"(?:{_WORDS.pattern})+")
# Words of a few letters turn up by chance in random tokens: only longer ones lower the estimate.
_SHORTEST_COUNTED_WORD: Final = 4


def token_weakness(token: str) -> str | None:
    """Why ``token`` must not be used, in words that never quote it; None if it may."""
    if not all(c in string.printable and not c.isspace() and c != "," for c in token):
        return "holds a character an HTTP header cannot carry (printable ASCII only)"
    if is_placeholder(token):
        return "is a placeholder, not a secret"
    bits = estimated_bits(token)
    if bits < MIN_TOKEN_BITS:
        return (
            f"is too guessable: about {bits:.0f} bits by labvirt's estimate, "
            f"{MIN_TOKEN_BITS} needed"
        )
    return None


def is_placeholder(token: str) -> bool:
    if len(set(token)) == 1:
        return True
    if token.startswith(_TEMPLATE_MARKERS):
        return True
    letters = "".join(c for c in token.lower() if c.isalnum())
    if letters.startswith(_PLACEHOLDER_STARTS):
        return True
    return _ONLY_WORDS.fullmatch(letters.rstrip(string.digits)) is not None


def estimated_bits(token: str) -> float:
    """The token's entropy as the module's rule estimates it."""
    if not token:
        return 0.0
    per_character = math.log2(_alphabet_size(token))
    lowered = token.lower()
    bits = 0.0
    position = 0
    while position < len(token):
        word = _WORDS.match(lowered, position)
        if word is not None and len(word.group()) >= _SHORTEST_COUNTED_WORD:
            bits += WORD_BITS
            position = word.end()
            continue
        bits += 1.0 if _continues_a_pattern(token, position) else per_character
        position += 1
    return bits


def _alphabet_size(token: str) -> int:
    size = sum(n for members, n in _CLASSES if any(c in members for c in token))
    if any(not c.isascii() or not c.isalnum() for c in token):
        size += _OTHER_CLASS_SIZE
    return size


def _continues_a_pattern(token: str, position: int) -> bool:
    """Whether the character at ``position`` is at least the third step of a run (the same
    step between neighbours: ``aaa``, ``123``, ``cba``) or of a repeat of a short chunk."""
    if position >= 2:
        step = ord(token[position]) - ord(token[position - 1])
        if abs(step) <= 1 and step == ord(token[position - 1]) - ord(token[position - 2]):
            return True
    for period in range(2, _LONGEST_REPEATED_CHUNK + 1):
        first = position - _PATTERN_STEPS + 1
        if first - period < 0:
            break
        if all(token[i] == token[i - period] for i in range(first, position + 1)):
            return True
    return False
