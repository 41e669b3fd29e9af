"""Indicator state that survives restarts: a snapshot in Redis plus a replay of what came after.

The snapshot records the ``klines.v1`` entry id of the last candle it contains.
When a replica becomes the owner of the group (at start, or a standby taking over)
it restores the snapshot and replays every entry after that id up to what the group
was handed, in stream order: acknowledged entries only feed the state (their events
were published), pending ones are published too, through the once-per-candle guard
(which refuses those that were published before the restart). The bus then hands the
pending entries over again; by then the state holds them and they are duplicates. So
a restart neither doubles nor drops a features event, and the state equals a run that
never stopped, whatever order pending and acknowledged entries sit in.
"""

from __future__ import annotations

import json
import logging
from typing import Any, AsyncIterator

import redis.asyncio as aioredis

from libs.common import topics
from libs.common.bus.framing import Decoder, payload_of
from libs.common.bus.groups import recorded_position
from libs.common.contracts import KlineEvent
# What a checkpoint is and how far it may go: ``position`` (no Redis there).
from services.features.position import Checkpoint, id_key

log = logging.getLogger("klinebus.features.checkpoint")

REPLAY_BATCH = 1000


def _key(partition: int = 0) -> str:
    # In the partition's slot; partition 0's is the unpartitioned key, so P=1 upgrades in place.
    return topics.stream_companion_key(topics.FEATURES, "engine-state", partition)


async def load(client: aioredis.Redis, partition: int = 0) -> Checkpoint | None:
    data: dict[bytes, Any] = await client.hgetall(_key(partition))
    if not data or b"snapshot" not in data:
        return None
    # A checkpoint written before origins were recorded has no "origins" field: None, unknown.
    origins = None
    if b"origins" in data:
        origins = {tuple(field.split("|", 1)): t for field, t in json.loads(data[b"origins"]).items()}
    return Checkpoint(data[b"snapshot"], data[b"entry_id"].decode(), origins)


async def save(client: aioredis.Redis, saved: Checkpoint, partition: int = 0) -> None:
    # One HSET: the snapshot, its position and its origins are never seen apart.
    origins = json.dumps({f"{s}|{i}": t for (s, i), t in (saved.origins or {}).items()})
    await client.hset(_key(partition), mapping={"snapshot": saved.snapshot, "entry_id": saved.entry_id, "origins": origins})


def _waiting_key(partition: int = 0) -> str:
    return topics.stream_companion_key(topics.FEATURES, "warming", partition)


async def record_waiting(client: aioredis.Redis, keys: dict[tuple[str, str], str], partition: int = 0) -> None:
    """Keys whose candles wait for their warm-up, with the first waiting entry id. Their entries
    are acknowledged while they wait; a restart replays and publishes them (``load_waiting``)."""
    await client.hset(_waiting_key(partition), mapping={f"{s}|{i}": entry for (s, i), entry in keys.items()})


async def load_waiting(client: aioredis.Redis, partition: int = 0) -> dict[tuple[str, str], str]:
    raw = await client.hgetall(_waiting_key(partition))
    out = {}
    for field, entry in raw.items():
        symbol, interval = field.decode().split("|")
        out[(symbol, interval)] = entry.decode()
    return out


async def release_waiting(client: aioredis.Redis, keys: list[tuple[str, str]], partition: int = 0) -> None:
    if keys:
        await client.hdel(_waiting_key(partition), *(f"{s}|{i}" for s, i in keys))


async def entries_after(
    client: aioredis.Redis, group: str, after_id: str, chunk: int = REPLAY_BATCH, partition: int = 0
) -> AsyncIterator[list[tuple[str, KlineEvent, bool]]]:
    """``klines.v1`` entries after ``after_id`` that ``group`` was handed (up to its last
    delivered id), in stream order, in chunks of ``(entry_id, event, pending)``.

    Acknowledged and pending entries come interleaved as they sit in the stream: a pending
    entry is not assumed to be newer than every acknowledged one (one left pending out of order
    by a failed XACK, or by an older build, still comes in its place). Entries that do not
    decode were dead-lettered when first delivered and are skipped."""
    stream = topics.stream_key(topics.KLINES, partition)
    groups = {g["name"].decode(): g for g in await client.xinfo_groups(stream)} if await client.exists(stream) else {}
    # The group may be gone (deleted, a failover without it): the position the service last
    # acknowledged, kept beside the stream, still says how far its published events go.
    bounds = [p for p in (await recorded_position(client, topics.KLINES, group, partition),) if p]
    if group in groups:
        bounds.append(groups[group]["last-delivered-id"].decode())
    if not bounds:
        return
    last_delivered = max(bounds, key=id_key)
    pending: set[str] = set()
    start = "-"
    while group in groups:
        rows = await client.xpending_range(stream, group, min=start, max="+", count=REPLAY_BATCH)
        pending.update(p["message_id"].decode() for p in rows)
        if len(rows) < REPLAY_BATCH:
            break
        start = "(" + rows[-1]["message_id"].decode()
    decoder = Decoder(KlineEvent)
    cursor = "(" + after_id if after_id != "0-0" else "-"
    end = id_key(last_delivered)
    while True:
        entries = await client.xrange(stream, min=cursor, max=last_delivered, count=chunk)
        ids = [e[0].decode() for e in entries]
        events, bad = decoder.many([payload_of(f) for _, f in entries])
        out = [
            (eid, ev, eid in pending)
            for i, (eid, ev) in enumerate(zip(ids, events))
            if i not in bad and id_key(eid) <= end
        ]
        if out:
            yield out
        if len(entries) < chunk:
            return
        cursor = "(" + ids[-1]
