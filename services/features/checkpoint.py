"""Indicator state that survives restarts: a snapshot in Redis plus a replay of what came after.

The snapshot records the ``klines.v1`` entry id of the last candle it contains.
On start the service restores it and replays, without publishing, every entry
after that id that its consumer group has already acknowledged (those were
published before the restart). Entries still pending are left alone: they
will be delivered again and must then produce their event. So a restart
neither doubles nor drops a features event, and the state equals a run that
never stopped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator

import redis.asyncio as aioredis

from libs.common import topics
from libs.common.bus import DATA_FIELD
from libs.common.contracts import KlineEvent

log = logging.getLogger("klinebus.features.checkpoint")

REPLAY_BATCH = 1000


@dataclass
class Checkpoint:
    snapshot: bytes
    entry_id: str  # last klines.v1 entry folded into the snapshot


def _key() -> str:
    return topics.stream_companion_key(topics.FEATURES, "engine-state")


async def load(client: aioredis.Redis) -> Checkpoint | None:
    data: dict[bytes, Any] = await client.hgetall(_key())
    if not data or b"snapshot" not in data:
        return None
    return Checkpoint(data[b"snapshot"], data[b"entry_id"].decode())


async def save(client: aioredis.Redis, snapshot: bytes, entry_id: str) -> None:
    await client.hset(_key(), mapping={"snapshot": snapshot, "entry_id": entry_id})


def id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


async def acknowledged_after(
    client: aioredis.Redis, group: str, after_id: str
) -> AsyncIterator[tuple[str, KlineEvent]]:
    """``klines.v1`` entries after ``after_id`` that ``group`` delivered and acknowledged, in order."""
    stream = topics.stream_key(topics.KLINES)
    groups = {g["name"].decode(): g for g in await client.xinfo_groups(stream)} if await client.exists(stream) else {}
    if group not in groups:
        return
    last_delivered = groups[group]["last-delivered-id"].decode()
    pending: set[str] = set()
    start = "-"
    while True:
        batch = await client.xpending_range(stream, group, min=start, max="+", count=REPLAY_BATCH)
        pending.update(p["message_id"].decode() for p in batch)
        if len(batch) < REPLAY_BATCH:
            break
        start = "(" + batch[-1]["message_id"].decode()
    cursor = "(" + after_id if after_id != "0-0" else "-"
    end = id_key(last_delivered)
    while True:
        entries = await client.xrange(stream, min=cursor, max=last_delivered, count=REPLAY_BATCH)
        for entry_id, fields in entries:
            eid = entry_id.decode()
            if eid in pending or id_key(eid) > end:
                continue
            try:
                yield eid, KlineEvent.from_json(fields[DATA_FIELD.encode()])
            except Exception:  # noqa: BLE001 - it was dead-lettered when first delivered
                continue
        if len(entries) < REPLAY_BATCH:
            return
        cursor = "(" + entries[-1][0].decode()
