"""Reading and writing topics in tests the way an outside subscriber would: plain XRANGE/XADD
on the stream keys, no consumer group."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Iterable

import orjson

from libs.common import topics
from libs.common.bus import DATA_FIELD, redis_client


async def recorded_partitions(client: Any) -> int:
    """The deployment's partition count as recorded in Redis (1 when none is recorded)."""
    raw = await client.get(topics.partitions_key())
    return int(raw) if raw is not None else 1


async def read_topic(url: str, topic: str, partitions: int | None = None) -> list[dict[str, Any]]:
    """Every event of ``topic``: each partition's stream in turn (so each key's events keep
    their order; keys of different partitions are not ordered among themselves). ``partitions``
    defaults to the count recorded in Redis."""
    client = redis_client(url)  # a RedisCluster for redis+cluster:// URLs
    try:
        count = partitions if partitions is not None else await recorded_partitions(client)
        entries = [e for key in topics.stream_keys(topic, count) for e in await client.xrange(key)]
    finally:
        await client.aclose()
    return [orjson.loads(fields[DATA_FIELD.encode()]) for _, fields in entries]


async def add_events(url: str, events: Iterable[Any]) -> None:
    """XADD each event (anything with ``topic`` and ``to_json``) to its topic, in order."""
    client = redis_client(url)  # a RedisCluster for redis+cluster:// URLs
    try:
        for event in events:
            await client.xadd(topics.stream_key(event.topic), {DATA_FIELD: event.to_json()})
    finally:
        await client.aclose()


async def wait_for_events(
    url: str, topic: str, expected: int, timeout: float = 60.0, settle: float = 0.3, strict: bool = True
) -> list[dict]:
    """The topic's events once at least ``expected`` are there (after ``settle`` seconds more, so a
    duplicate would show). If they do not arrive in time: raise, or with ``strict=False`` return
    what is there, for a test that compares it in full."""
    deadline = time.monotonic() + timeout
    got: list[dict] = []
    while time.monotonic() < deadline:
        got = await read_topic(url, topic)
        if len(got) >= expected:
            await asyncio.sleep(settle)
            return await read_topic(url, topic)
        await asyncio.sleep(0.05)
    if not strict:
        return got
    raise AssertionError(f"{topic}: {len(got)} of {expected} events after {timeout:.0f}s")


def open_times_by_stream(events: Iterable[dict]) -> dict[tuple[str, str], list[int]]:
    out: dict[tuple[str, str], list[int]] = {}
    for e in events:
        out.setdefault((e["symbol"], e["interval"]), []).append(e["open_time"])
    return out


@contextlib.asynccontextmanager
async def replaying(candles, **kw):
    """An exchange simulator whose replay waits for ``begin_when_connected``."""
    from services.ingest.simulator import ExchangeSimulator

    sim = ExchangeSimulator(candles, **kw)
    await sim.start(replay=False)
    try:
        yield sim
    finally:
        await sim.stop()
