"""The subscriptions faststream knows are for the AsyncAPI document only: a started bus starts
its publishers, never those subscriptions (which would create their own group and consume),
across a stop and a second start, with no private faststream attribute involved."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import redis.asyncio as aioredis
from faststream.specification import AsyncAPI

from libs.common import topics
from libs.common.bus import Bus, core
from libs.common.contracts import FeaturesEvent, KlineEvent


def kline(open_time: int) -> KlineEvent:
    return KlineEvent(symbol="BTCUSDT", interval="1m", open_time=open_time, close_time=open_time + 59_999,
                      open=100.0, high=101.0, low=99.0, close=100.5, volume=3.0)


def channels(bus: Bus) -> set[str]:
    doc = AsyncAPI(bus.broker, schema_version="3.0.0").to_specification().to_jsonable()
    return {c["address"] for c in doc["channels"].values()}


async def until(cond, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def test_documented_subscriptions_are_never_started_and_the_document_survives_restarts(redis_url):
    bus = Bus("docs", redis_url, consumer="c")
    seen: list[int] = []
    bus.publisher(topics.KLINES, KlineEvent)

    @bus.competing(topics.KLINES)
    async def on_kline(event: KlineEvent) -> None:
        seen.append(event.open_time)

    @bus.ordered(topics.FEATURES, FeaturesEvent)
    async def on_features(event: FeaturesEvent, entry_id: str) -> None:
        return None

    documented = channels(bus)
    assert {topics.stream_key(topics.KLINES), topics.stream_key(topics.FEATURES)} <= documented
    client = aioredis.Redis.from_url(redis_url)
    try:
        for round_ in range(2):  # a stopped bus starts again the same way
            await bus.start()
            try:
                assert bus.broker.subscribers and not any(s.running for s in bus.broker.subscribers)
                await bus.publish(kline(round_ * 60_000))

                async def handled() -> bool:
                    return len(seen) == round_ + 1

                await until(handled)
                consumers = await client.xinfo_consumers(topics.stream_key(topics.KLINES), "docs")
                assert [c["name"] for c in consumers] == [b"c"]  # ours only: no faststream consumer
            finally:
                await bus.stop()
            assert channels(bus) == documented
    finally:
        await client.aclose()
    assert seen == [0, 60_000]


def test_the_bus_touches_no_private_faststream_attribute():
    tree = ast.parse(Path(core.__file__).read_text())
    private = [n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr.startswith("_")
               and isinstance(n.value, ast.Attribute) and n.value.attr == "broker"]
    assert private == []
