"""Idempotency keys in Redis: one record per (credential, key), sealed so Redis alone tells
nothing.

A create that carries an ``Idempotency-Key`` first *claims* its record (``SET NX`` with a short
TTL): the one request that wins does the work, then replaces its claim with the answer it gave
(kept for the key's lifetime), or deletes its claim when it failed, so a retry can succeed.
Every other request with the same key finds the claim (in flight) or the answer (to replay).

The answer holds a live session token, which labvirt otherwise keeps only as a hash. So every
record is sealed with AES-GCM under a key derived (HKDF-SHA256) from the credential and the
idempotency key, and the record's Redis key is another derivation of the same pair: a reader of
Redis learns neither the token of the answer, nor the idempotency key, nor the credential.

Every operation touches one Redis key (``SET NX``, ``GET``, ``WATCH``/``MULTI``; no Lua), so
this works on Redis Cluster and on Redis servers without scripting.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import redis
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PREFIX: Final = "labvirt:idempotency"
# A claim outlives any request (gunicorn kills a worker after 60 s) and frees the key by itself
# when the process that held it died mid-request.
CLAIM_SECONDS: Final = 60
_SEAL_INFO: Final = b"labvirt idempotency v1: record sealing key"
_NAME_INFO: Final = b"labvirt idempotency v1: redis key name"
_NONCE_BYTES: Final = 12
_PENDING: Final = "pending"
_DONE: Final = "done"


class CorruptRecord(RuntimeError):
    """A record that does not open under its key: altered in Redis, or of another format."""


def body_fingerprint(body: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a validated body: what "the same request" means."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class IdempotencyScope:
    """Where one (credential, idempotency key) pair lives in Redis, and how its record is sealed.

    Two credentials using the same idempotency key get unrelated scopes.
    """

    redis_key: str
    seal_key: bytes = field(repr=False)  # never in a log line

    @classmethod
    def derive(cls, *, credential: str, idempotency_key: str) -> IdempotencyScope:
        # Length-prefixed, so no two pairs share an input ("ab" + "c" vs "a" + "bc").
        material = b"%d:%s%s" % (
            len(credential.encode()),
            credential.encode(),
            idempotency_key.encode(),
        )
        name = _hkdf(material, _NAME_INFO).hex()
        return cls(redis_key=f"{PREFIX}:{name}", seal_key=_hkdf(material, _SEAL_INFO))

    def seal(self, record: Mapping[str, Any]) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        plain = json.dumps(record, separators=(",", ":")).encode()
        # The Redis key is the associated data: a record moved under another key does not open.
        return nonce + AESGCM(self.seal_key).encrypt(nonce, plain, self.redis_key.encode())

    def open(self, sealed: bytes) -> dict[str, Any]:
        nonce, ciphertext = sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:]
        try:
            plain = AESGCM(self.seal_key).decrypt(nonce, ciphertext, self.redis_key.encode())
            record = json.loads(plain)
        except (InvalidTag, ValueError) as exc:  # altered, or not our JSON: the same verdict
            raise CorruptRecord(f"{self.redis_key} does not open under its key") from exc
        if not isinstance(record, dict):
            raise CorruptRecord(f"{self.redis_key} holds no record")
        return record


def _hkdf(material: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(material)


@dataclass(frozen=True)
class StoredResponse:
    """The answer a replay gives: status, body as sent, and the headers that matter."""

    status: int
    body: str
    content_type: str
    location: str | None


@dataclass(frozen=True)
class Claimed:
    """This request holds the key: it does the work, then ``complete``s or ``release``s.

    ``sealed`` is the claim's exact bytes: each seal has a fresh nonce, so it also proves which
    request holds the claim."""

    fingerprint: str
    sealed: bytes


@dataclass(frozen=True)
class InFlight:
    """Another request holds the key and has not answered yet."""

    fingerprint: str


@dataclass(frozen=True)
class Completed:
    """A request with this key already answered; ``response`` is what it answered."""

    fingerprint: str
    response: StoredResponse


Claim = Claimed | InFlight | Completed


class IdempotencyStore:
    def __init__(
        self, client: redis.Redis, *, ttl_seconds: int, claim_seconds: int = CLAIM_SECONDS
    ) -> None:
        self._redis = client
        self._ttl = ttl_seconds
        self._claim_seconds = claim_seconds

    def claim(self, scope: IdempotencyScope, fingerprint: str) -> Claim:
        """Take the key for this request, or say who has it: claim-or-get in one step each."""
        sealed = scope.seal({"state": _PENDING, "fingerprint": fingerprint})
        while True:
            if self._redis.set(scope.redis_key, sealed, nx=True, ex=self._claim_seconds):
                return Claimed(fingerprint, sealed)
            current = self._redis.get(scope.redis_key)
            if current is not None:
                return _decode(scope, _as_bytes(current))
            # Released or expired between SET and GET: try to take it again.

    def complete(self, scope: IdempotencyScope, claim: Claimed, response: StoredResponse) -> bool:
        """Replace this request's claim with its answer for the key's lifetime; False when the
        claim is no longer this request's (it outlived ``claim_seconds``)."""
        sealed = scope.seal(
            {
                "state": _DONE,
                "fingerprint": claim.fingerprint,
                "status": response.status,
                "body": response.body,
                "content_type": response.content_type,
                "location": response.location,
            }
        )
        return self._swap_own_claim(scope, claim, sealed)

    def release(self, scope: IdempotencyScope, claim: Claimed) -> bool:
        """Drop this request's claim (its work failed), so the key does not stay pinned."""
        return self._swap_own_claim(scope, claim, None)

    def _swap_own_claim(
        self, scope: IdempotencyScope, claim: Claimed, replacement: bytes | None
    ) -> bool:
        key = scope.redis_key
        swapped = False

        def swap(pipe: Any) -> None:
            nonlocal swapped
            current = pipe.get(key)
            pipe.multi()
            swapped = current is not None and _as_bytes(current) == claim.sealed
            if not swapped:
                return
            if replacement is None:
                pipe.delete(key)
            else:
                pipe.set(key, replacement, ex=self._ttl)

        self._redis.transaction(swap, key)
        return swapped


def _decode(scope: IdempotencyScope, sealed: bytes) -> InFlight | Completed:
    record = scope.open(sealed)
    fingerprint = str(record.get("fingerprint", ""))
    if record.get("state") == _PENDING:
        return InFlight(fingerprint)
    if record.get("state") != _DONE:
        raise CorruptRecord(f"{scope.redis_key} is in no known state")
    location = record.get("location")
    return Completed(
        fingerprint,
        StoredResponse(
            status=int(record["status"]),
            body=str(record["body"]),
            content_type=str(record["content_type"]),
            location=None if location is None else str(location),
        ),
    )


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    raise TypeError("records are binary: use a Redis client that does not decode responses")
