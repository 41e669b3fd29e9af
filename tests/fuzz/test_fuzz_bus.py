"""Mutated entries through a real consumer on a real Redis: each entry is handled or dead-lettered
(exactly one of the two), the consumer stays alive, and an entry over the size cap is refused
unparsed, its letter bounded."""

from __future__ import annotations

import asyncio
import os
import random
import time

import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from libs.common import topics
from libs.common.bus import Bus
from libs.common.contracts import EVENT_TYPES
from libs.common.telemetry import ServiceMetrics
from tests.fuzz import harness

ENTRIES = int(os.environ.get("KLINEBUS_FUZZ_BUS_ENTRIES", "600"))
CAP = 4096
DEADLINE_S = 120.0


@pytest.mark.parametrize(("service", "topic", "ordered"), [
    ("features", topics.KLINES, True),
    ("inference", topics.MODELS, True),
    ("charts", topics.CHART_REQUESTS, False),
    ("alerts", topics.ALERTS, False),
])
async def test_every_mutated_entry_is_handled_or_dead_lettered(redis_url, service, topic, ordered):
    rng = random.Random(f"bus:{service}:{topic}")
    raws = harness.mutants(harness.bus_seeds(topic), rng, ENTRIES)
    raws.append(b'{"pad": "' + b"x" * (CAP * 4) + b'"}')  # over the cap
    admin = aioredis.Redis.from_url(redis_url)
    key = topics.stream_key(topic)
    for i in range(0, len(raws), 200):
        async with admin.pipeline(transaction=False) as pipe:
            for r in raws[i:i + 200]:
                pipe.xadd(key, {"__data__": r})
            await pipe.execute()
    bus = Bus(service, redis_url, consumer=f"{service}-fuzz", metrics=ServiceMetrics(service, CollectorRegistry()),
              max_event_bytes=CAP)
    handled = []
    model = EVENT_TYPES[topic]
    if ordered:
        async def on_event(ev, entry_id):
            handled.append(entry_id)
        bus.ordered(topic, model)(on_event)
    else:
        async def on_event(ev):
            handled.append(ev)
        on_event.__annotations__ = {"ev": model}
        bus.competing(topic)(on_event)
    await bus.start()
    try:
        deadline = time.monotonic() + DEADLINE_S
        while True:
            letters = await admin.xlen(topics.stream_key(topics.DEAD_LETTERS))
            (group,) = [g for g in await admin.xinfo_groups(key) if g["name"].decode() == service]
            if len(handled) + letters >= len(raws) and group["pending"] == 0:
                break
            assert time.monotonic() < deadline, (len(handled), letters, len(raws))
            assert bus.alive(), bus.fatal
            await asyncio.sleep(0.05)
        assert len(handled) + letters == len(raws)
        assert handled and letters  # both paths were taken
        (last,) = await admin.xrevrange(topics.stream_key(topics.DEAD_LETTERS), count=1)
        letter = orjson.loads(last[1][b"__data__"])
        assert f"over the {CAP}-byte cap" in letter["reason"] and len(letter["payload"]) < CAP + 100
    finally:
        await bus.stop()
        await admin.aclose()
