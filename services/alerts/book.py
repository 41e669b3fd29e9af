"""The alert book: which alerts are active, since when, and which destination has been told what.

Kept in Redis beside ``alerts.v1`` (same cluster slot), so replicas of the service share it and a
restart forgets nothing: one hash per alert (``...:alert:<fingerprint>``: the alert's document and,
per destination, the last firing delivered, when chat was last told, whether the resolve went out)
a set of the active fingerprints, and a set of what a destination still owes (it kept failing: the
event was acknowledged, the debt is retried every tick, so one destination down never holds up the
others). Re-deliveries are recognised here: an event already delivered to a destination is not
sent to it again."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import orjson
import redis.asyncio as aioredis

from libs.common import topics
from libs.common.contracts import AlertEvent

RESOLVED_RETENTION_S = 86_400  # a resolved alert's record is kept a day: late re-deliveries stay recognisable
ACTIVE = topics.stream_companion_key(topics.ALERTS, "active")
# (alert, destination) pairs a destination still owes: it failed after every try; retried every tick.
OWED = topics.stream_companion_key(topics.ALERTS, "owed")
# A state transition takes milliseconds; a lock older than this belongs to a replica that died.
LOCK_TTL_MS = 10_000
LOCK_POLL_S = 0.01
# KEYS[1] lock; ARGV[1] token: delete only our own lock.
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def alert_key(fp: str) -> str:
    return topics.stream_companion_key(topics.ALERTS, f"alert:{fp}")


@dataclass
class AlertState:
    fingerprint: str
    doc: dict[str, Any]
    sent: dict[str, int] = field(default_factory=dict)  # destination -> fired_at of the last firing delivered
    notified: dict[str, int] = field(default_factory=dict)  # chat destination -> wall ms it was last told
    resolved_sent: set[str] = field(default_factory=set)  # destinations told of the resolve

    @property
    def status(self) -> str:
        return self.doc["status"]

    @property
    def starts_at(self) -> int:
        return int(self.doc["starts_at"])

    @property
    def fired_at(self) -> int:
        return int(self.doc["fired_at"])

    @property
    def expires_at(self) -> int:
        return int(self.doc["expires_at"])

    @property
    def resolved_at(self) -> int | None:
        v = self.doc.get("resolved_at")
        return None if v is None else int(v)


def _doc(event: AlertEvent, labels: dict[str, str], starts_at: int, expires_at: int) -> dict[str, Any]:
    return {
        "labels": labels, "rule": event.rule, "severity": event.severity, "message": event.message,
        "symbol": event.symbol, "interval": event.interval, "open_time": event.open_time,
        "value": event.value, "threshold": event.threshold, "starts_at": starts_at,
        "fired_at": event.fired_at, "expires_at": expires_at, "status": "firing", "resolved_at": None,
    }


class AlertBook:
    def __init__(self, client: aioredis.Redis, max_age_ms: int) -> None:
        self.client = client
        self.max_age_ms = max_age_ms
        self._unlock = client.register_script(_UNLOCK)

    @contextlib.asynccontextmanager
    async def locked(self, fp: str) -> AsyncIterator[None]:
        """One state transition of an alert at a time across replicas: a firing and its resolve
        taken by two replicas at once must not both read "unknown" and write in either order."""
        key = topics.stream_companion_key(topics.ALERTS, f"lock:{fp}")
        token = uuid.uuid4().hex
        while not await self.client.set(key, token, nx=True, px=LOCK_TTL_MS):
            await asyncio.sleep(LOCK_POLL_S)
        try:
            yield
        finally:
            await self._unlock(keys=[key], args=[token])

    async def load(self, fp: str) -> AlertState | None:
        raw = await self.client.hgetall(alert_key(fp))
        if not raw or b"doc" not in raw:
            return None
        st = AlertState(fp, orjson.loads(raw[b"doc"]))
        for k, v in raw.items():
            name = k.decode()
            if name.startswith("sent:"):
                st.sent[name[5:]] = int(v)
            elif name.startswith("notified:"):
                st.notified[name[9:]] = int(v)
            elif name.startswith("resolved:"):
                st.resolved_sent.add(name[9:])
        return st

    async def _save_new(self, st: AlertState, ttl_s: int) -> None:
        key = alert_key(st.fingerprint)
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(key)
        pipe.hset(key, "doc", orjson.dumps(st.doc))
        pipe.expire(key, ttl_s)
        if st.status == "firing":
            pipe.sadd(ACTIVE, st.fingerprint)
        else:
            pipe.srem(ACTIVE, st.fingerprint)
        await pipe.execute()

    async def _save_doc(self, st: AlertState, ttl_s: int) -> None:
        key = alert_key(st.fingerprint)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(key, "doc", orjson.dumps(st.doc))
        pipe.expire(key, ttl_s)
        await pipe.execute()

    def _firing_ttl(self) -> int:
        return self.max_age_ms // 1000 + RESOLVED_RETENTION_S

    async def record_firing(self, event: AlertEvent, labels: dict[str, str], fp: str, now: int) -> tuple[AlertState, str]:
        """Returns the state after this firing and what it was: ``new`` (an alert starts),
        ``refire`` (still active; a re-delivery too) or ``stale`` (older than what is known)."""
        st = await self.load(fp)
        expires = max(now, event.fired_at) + self.max_age_ms
        if st is not None and st.status == "resolved" and event.fired_at <= (st.resolved_at or 0):
            return st, "stale"  # a re-delivered firing from before the resolve
        if st is None or st.status == "resolved" or st.expires_at < now:
            st = AlertState(fp, _doc(event, labels, event.fired_at, expires))
            await self._save_new(st, self._firing_ttl())
            return st, "new"
        if event.fired_at < st.fired_at:
            return st, "stale"
        starts = st.starts_at
        st.doc = _doc(event, labels, starts, expires)
        await self._save_doc(st, self._firing_ttl())
        return st, "refire"

    async def record_resolved(self, event: AlertEvent, labels: dict[str, str], fp: str) -> tuple[AlertState, str]:
        """``resolved`` (it was active, or its resolve is being re-delivered), ``stale`` (a resolve
        older than the current firing) or ``unknown`` (never seen firing here)."""
        st = await self.load(fp)
        if st is None:
            st = AlertState(fp, _doc(event, labels, event.fired_at, event.fired_at))
            st.doc.update(status="resolved", resolved_at=event.fired_at)
            await self._save_new(st, RESOLVED_RETENTION_S)
            return st, "unknown"
        if st.status == "resolved":
            return st, "resolved"
        if event.fired_at < st.fired_at:
            return st, "stale"
        await self.resolve(st, event.fired_at, event.message)
        return st, "resolved"

    async def resolve(self, st: AlertState, at: int, message: str | None = None) -> None:
        st.doc.update(status="resolved", resolved_at=at)
        if message:
            st.doc["message"] = message
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(alert_key(st.fingerprint), "doc", orjson.dumps(st.doc))
        pipe.expire(alert_key(st.fingerprint), RESOLVED_RETENTION_S)
        pipe.srem(ACTIVE, st.fingerprint)
        await pipe.execute()

    async def claim_expired(self, fp: str) -> bool:
        """One replica wins the right to resolve an expired alert (the one whose SREM removed it)."""
        return bool(await self.client.srem(ACTIVE, fp))

    async def mark(self, fp: str, sink: str, *, fired_at: int | None = None, notified_at: int | None = None,
                   resolved: bool = False) -> None:
        mapping: dict[str, Any] = {}
        if fired_at is not None:
            mapping[f"sent:{sink}"] = fired_at
        if notified_at is not None:
            mapping[f"notified:{sink}"] = notified_at
        if resolved:
            mapping[f"resolved:{sink}"] = 1
        if mapping:
            await self.client.hset(alert_key(fp), mapping=mapping)

    async def active(self) -> list[str]:
        return sorted(m.decode() for m in await self.client.smembers(ACTIVE))

    async def owe(self, fp: str, sink: str) -> None:
        await self.client.sadd(OWED, f"{fp}|{sink}")

    async def settle(self, fp: str, sink: str) -> None:
        await self.client.srem(OWED, f"{fp}|{sink}")

    async def owed(self) -> list[tuple[str, str]]:
        return sorted(tuple(m.decode().split("|", 1)) for m in await self.client.smembers(OWED))  # type: ignore[misc]
