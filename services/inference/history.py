"""Reading topics backwards at start: what the service rebuilds its state from after a restart.

Windows come back from ``features.v1`` (only entries this service's group had already taken,
so nothing is counted twice when the rest is delivered; one partition's stream at a time, the
partition a replica takes), rolling scores from ``scores.v1``,
forecasts still waiting for their target from ``predictions.v1``, active alerts from
``alerts.v1``, and which version of each model is current from ``models.v1``.
"""

from __future__ import annotations

from typing import Any, AsyncIterator

import orjson

from libs.common import topics
from libs.common.bus import DATA_FIELD
from libs.common.bus.framing import entry_id_before
from libs.common.bus.framing import entry_id_key as id_key

PAGE = 1000


async def scan_back(client: Any, topic: str, upper: str = "+", limit: int = 0,
                    partition: int = 0) -> AsyncIterator[tuple[str, dict]]:
    """``(entry_id, event dict)`` newest first, from ``upper`` (inclusive) down, at most ``limit``
    entries (0: to the stream's start), of the topic's stream ``partition`` (an unpartitioned
    topic has partition 0 only). Entries that are not JSON objects are skipped: they were
    dead-lettered when first consumed."""
    key = topics.stream_key(topic, partition)
    field = DATA_FIELD.encode()
    seen = 0
    while True:
        count = PAGE if not limit else min(PAGE, limit - seen)
        if count <= 0:
            return
        entries = await client.xrevrange(key, max=upper, min="-", count=count)
        for entry_id, fields in entries:
            eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
            seen += 1
            raw = (fields or {}).get(field)
            if raw is None:
                continue
            try:
                doc = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if isinstance(doc, dict):
                yield eid, doc
        if len(entries) < count:
            return
        last = entries[-1][0]
        upper = "(" + (last.decode() if isinstance(last, bytes) else str(last))


async def taken_upper_bound(client: Any, topic: str, group: str, partition: int = 0) -> str | None:
    """The newest entry of ``topic``'s stream ``partition`` that ``group`` took and will not be
    handed again: below its oldest pending entry and at most its last delivered one. None when it
    took nothing yet."""
    key = topics.stream_key(topic, partition)
    try:
        groups = await client.xinfo_groups(key)
    except Exception:  # noqa: BLE001 - no stream yet
        return None
    info = next((g for g in groups if _s(g.get("name")) == group), None)
    if info is None:
        return None
    last = _s(info.get("last-delivered-id")) or "0-0"
    if last == "0-0":
        return None
    pending = await client.xpending(key, group)
    lowest = _s(pending.get("min")) if pending and pending.get("pending") else None
    if lowest:
        if id_key(lowest) == (0, 0):
            return None
        below = entry_id_before(lowest)
        return below if id_key(below) < id_key(last) else last
    return last


def _s(v: Any) -> str | None:
    if v is None:
        return None
    return v.decode() if isinstance(v, bytes) else str(v)


async def last_published(client: Any, topic: str) -> dict[str, int]:
    """The once-per-candle guard's hash: ``symbol|interval|key...`` -> last open_time appended."""
    from libs.common.bus import LAST_OPEN_TIME

    raw = await client.hgetall(topics.stream_companion_key(topic, LAST_OPEN_TIME))
    return {(_s(k) or ""): int(v) for k, v in raw.items()}
