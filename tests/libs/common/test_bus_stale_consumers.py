"""Dead consumers do not stay in a group forever: the entries a dead replica left pending are
claimed and handled, then it and any other long-idle consumer are removed (XGROUP DELCONSUMER).

The ghosts here really exist before the bus starts (on Redis 6.2 an XREADGROUP that returns
nothing creates no consumer, so a ghost made that way would prove nothing)."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from libs.common import topics
from libs.common.bus import DATA_FIELD, Bus
from libs.common.contracts import KlineEvent

KEY = topics.stream_key(topics.KLINES)
pytestmark = pytest.mark.timeout(120)


def kline(i: int) -> KlineEvent:
    t = i * 60_000
    return KlineEvent(symbol="BTCUSDT", interval="1m", open_time=t, close_time=t + 59_999,
                      open=100.0, high=101.0, low=99.0, close=100.5, volume=3.0)


async def consumers(client) -> dict[str, int]:
    return {c["name"].decode(): c["pending"] for c in await client.xinfo_consumers(KEY, "features")}


async def test_a_dead_replica_s_pending_entries_are_handled_and_dead_consumers_removed(redis_url):
    client = aioredis.Redis.from_url(redis_url)
    await client.xgroup_create(KEY, "features", id="0", mkstream=True)
    for i in range(5):
        await client.xadd(KEY, {DATA_FIELD: kline(i).to_json()})
    # "idle-pod" read and acknowledged one entry long ago; "dead-pod" read the next three and died
    (entry,) = (await client.xreadgroup("features", "idle-pod", {KEY: ">"}, count=1))[0][1]
    await client.xack(KEY, "features", entry[0])
    await client.xreadgroup("features", "dead-pod", {KEY: ">"}, count=3)
    assert await consumers(client) == {"idle-pod": 0, "dead-pod": 3}

    seen: list[int] = []
    bus = Bus("features", redis_url, consumer="c", stale_consumer_ms=1, monitor_interval_s=0.05)

    @bus.ordered(topics.KLINES, KlineEvent)
    async def handle(event: KlineEvent, entry_id: str) -> None:
        seen.append(event.open_time // 60_000)

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    await bus.start()
    try:
        while len(seen) < 4 or set(await consumers(client)) - {"c"}:
            assert loop.time() < deadline, f"seen {seen}, consumers {await consumers(client)}"
            await asyncio.sleep(0.05)
        left = await consumers(client)
    finally:
        await bus.stop()
        await client.aclose()
    assert seen == [1, 2, 3, 4]  # the dead pod's three first, in order, then the new one
    assert left == {"c": 0}
