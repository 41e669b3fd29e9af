"""Signed control topics: ``models.v1`` and ``datasets.v1`` carry an HMAC-SHA256 signature.

Why HMAC and not Ed25519 (docs/threat-model.md, "Control topics"): no new dependency (the standard
library's ``hmac``; ``cryptography`` is not in the base install), the key is a Kubernetes Secret like
the Redis password, and the two control topics each have one producer and one consumer, both ours.

The keyring is ``KLINEBUS_CONTROL_KEYS``: ``<key-id>:<secret>[,<key-id>:<secret>...]``. The first key
signs; every key verifies, so a rotation adds the new key first, rolls every service, then drops the
old one. A secret is at least 32 characters (e.g. ``python -c "import secrets; print(secrets.token_hex(32))"``).

What is signed (``canonical_bytes``), exactly::

    b"klinebus-control-v1\\n" + topic + b"\\n" + orjson.dumps(body, option=OPT_SORT_KEYS)

where ``body`` is the event as its contract reads it (``model_dump(mode="json")``) without the
``signature`` field and without top-level fields whose value is null (so a later optional field,
absent or null, does not change what an older producer signed). The topic name keeps a signature of
one topic from being valid on another. The ``signature`` field is ``<key-id>:<64 hex digits>``.

A signature proves who wrote an event, not when: a replayed, unchanged event still verifies (see the
threat model for what that allows and what bounds it).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, TypeVar

import orjson

SIGNATURE_FIELD = "signature"
CONTEXT = b"klinebus-control-v1"
MIN_SECRET_CHARS = 32
SETTING = "KLINEBUS_CONTROL_KEYS"
_KEY_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")

log = logging.getLogger("klinebus.signing")
E = TypeVar("E")


class KeyringError(ValueError):
    """The keyring setting is malformed; one line that never includes a secret."""


class SignatureError(ValueError):
    """An event whose signature is missing, unknown or wrong. ``kind`` is a metric label."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"{kind}: {reason}")
        self.kind = kind


def canonical_bytes(topic: str, doc: dict[str, Any]) -> bytes:
    """The bytes an HMAC covers for an event of ``topic`` whose JSON form is ``doc``."""
    body = {k: v for k, v in doc.items() if k != SIGNATURE_FIELD and v is not None}
    return CONTEXT + b"\n" + topic.encode() + b"\n" + orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def _doc(event: Any) -> dict[str, Any]:
    # The consumer's view: the event as the wire carries it, read back by its own contract, so both
    # ends sign the same numbers (an int metric is a float once decoded, a tuple a list, ...).
    if isinstance(event, dict):
        return event
    return type(event).model_validate_json(event.to_json()).model_dump(mode="json")


@dataclass(frozen=True)
class Keyring:
    keys: tuple[tuple[str, bytes], ...]  # (key id, secret); the first signs

    @classmethod
    def parse(cls, value: Any) -> Keyring | None:
        """``None`` for an empty setting; ``KeyringError`` (naming no secret) for a malformed one."""
        if value is None:
            return None
        text = value.get_secret_value() if hasattr(value, "get_secret_value") else str(value)
        if not text.strip():
            return None
        keys: list[tuple[str, bytes]] = []
        for n, item in enumerate(p.strip() for p in text.split(",")):
            kid, sep, secret = item.partition(":")
            if not sep or not kid or not set(kid) <= _KEY_ID_CHARS:
                raise KeyringError(f"{SETTING}: entry {n + 1} must be <key-id>:<secret> with a key id of letters, digits, . _ -")
            if len(secret) < MIN_SECRET_CHARS:
                raise KeyringError(f"{SETTING}: key {kid!r} is shorter than {MIN_SECRET_CHARS} characters")
            if any(k == kid for k, _ in keys):
                raise KeyringError(f"{SETTING}: key id {kid!r} appears twice")
            keys.append((kid, secret.encode()))
        return cls(tuple(keys))

    @property
    def signing_key_id(self) -> str:
        return self.keys[0][0]

    def signature(self, topic: str, event: Any) -> str:
        kid, secret = self.keys[0]
        return f"{kid}:{hmac.new(secret, canonical_bytes(topic, _doc(event)), hashlib.sha256).hexdigest()}"

    def sign(self, topic: str, event: E) -> E:
        """A copy of ``event`` (a contract model) carrying its signature for ``topic``."""
        return event.model_copy(update={SIGNATURE_FIELD: self.signature(topic, event)})  # type: ignore[attr-defined]

    def verify(self, topic: str, event: Any) -> str:
        """The key id that signed ``event``; ``SignatureError`` when none of ours did."""
        doc = _doc(event)
        sig = doc.get(SIGNATURE_FIELD)
        if not sig or not isinstance(sig, str):
            raise SignatureError("unsigned", f"{topic} event carries no signature")
        kid, _, digest = sig.rpartition(":")
        secret = dict(self.keys).get(kid)
        if secret is None:
            raise SignatureError("unknown_key", f"{topic} event signed with key id {kid[:40]!r}, which is not in {SETTING}")
        want = hmac.new(secret, canonical_bytes(topic, doc), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(want, digest):
            raise SignatureError("bad_signature", f"{topic} event signature does not match its content (key {kid!r})")
        return kid


class ControlGuard:
    """What a consumer of a control topic runs before anything else: verify, or dead-letter.

    Without a keyring every control event is refused; ``warn_unconfigured`` says so once, at start.
    A refusal counts ``klinebus_<service>_control_refused_total{topic,kind}``, writes a dead letter
    (which logs the one line) and returns False.
    """

    def __init__(self, keyring: Keyring | None, metrics: Any,
                 dead_letter: Callable[[str, Any, str], Awaitable[None]]) -> None:
        self.keyring = keyring
        self.dead_letter = dead_letter
        self.refused = metrics.counter("control_refused_total", "Control-topic events refused (signature)", ["topic", "kind"])

    def warn_unconfigured(self, service: str, topics: list[str]) -> None:
        if self.keyring is None:
            log.error("%s: %s is not set: every %s event will be refused (dead-lettered)",
                      service, SETTING, " / ".join(topics))

    def check(self, topic: str, event: Any) -> SignatureError | None:
        """None when ``event`` is signed by a key of ours; else why not (nothing written)."""
        if self.keyring is None:
            return SignatureError("no_control_key", f"{topic} event refused: {SETTING} is not set on this service")
        try:
            self.keyring.verify(topic, event)
        except SignatureError as exc:
            return exc
        return None

    async def admit(self, topic: str, event: Any) -> bool:
        problem = self.check(topic, event)
        if problem is None:
            return True
        self.refused.labels(topic, problem.kind).inc()
        raw = event.to_json() if hasattr(event, "to_json") else event
        await self.dead_letter(topic, raw, str(problem))
        return False

    def sign(self, topic: str, event: E) -> E:
        """Signed when this service has a key; as it is otherwise (its consumers will refuse it)."""
        return self.keyring.sign(topic, event) if self.keyring is not None else event
