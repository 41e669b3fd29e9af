"""Ordered consumers on a real Redis: retries in place, start-up recovery of pending entries,
bugs dead-lettered after a few tries. Nothing overtakes, nothing is lost."""

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from libs.common.bus import failures
from libs.common import topics
from libs.common.bus import DATA_FIELD, Bus
from libs.common.contracts import KlineEvent
from tests.streams import read_topic


BUG_LINE = next(i for i, line in enumerate(open(__file__), 1) if line.rstrip().endswith('"a bug")  # BUG_LINE'))


def kline(i: int) -> KlineEvent:
    t = i * 60_000
    return KlineEvent(symbol="BTCUSDT", interval="1m", open_time=t, close_time=t + 59_999,
                      open=100.0, high=101.0, low=99.0, close=100.5, volume=3.0)


async def add(client, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        await client.xadd(topics.stream_key(topics.KLINES), {DATA_FIELD: kline(i).to_json()})


async def until(predicate, timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(failures, "RETRY_FIRST_S", 0.01)
    monkeypatch.setattr(failures, "RETRY_MAX_S", 0.05)


async def start(consumer: Bus) -> None:
    await consumer.start()


async def test_a_failure_is_retried_in_place_and_nothing_overtakes_it(redis_url):
    seen: list[int] = []
    failed = {"n": 0}
    consumer = Bus("features", redis_url, consumer="c")

    @consumer.ordered(topics.KLINES, KlineEvent)
    async def handle(event: KlineEvent, entry_id: str) -> None:
        if event.open_time == 5 * 60_000 and failed["n"] < 3:
            failed["n"] += 1
            raise RedisConnectionError("publish failed")  # Redis blipped while publishing
        seen.append(event.open_time // 60_000)

    client = aioredis.Redis.from_url(redis_url)
    await add(client, 20)
    retries_before = consumer.metrics.retries.labels(topics.KLINES)._value.get()
    await start(consumer)
    try:
        await until(lambda: len(seen) == 20)
        assert seen == list(range(20))
        assert failed["n"] == 3
        assert consumer.metrics.retries.labels(topics.KLINES)._value.get() - retries_before == 3
    finally:
        await consumer.stop()
        await client.aclose()


async def test_entries_a_crashed_replica_left_pending_are_handled_first_in_order(redis_url):
    client = aioredis.Redis.from_url(redis_url)
    key = topics.stream_key(topics.KLINES)
    await client.xgroup_create(key, "features", id="0", mkstream=True)
    await add(client, 10)
    # The crashed replica read 0..9 and acknowledged only 0..3.
    entries = (await client.xreadgroup("features", "dead-pod", {key: ">"}))[0][1]
    await client.xack(key, "features", *[e[0] for e in entries[:4]])
    await add(client, 10, start=10)  # live candles keep arriving meanwhile

    seen: list[int] = []
    consumer = Bus("features", redis_url, consumer="new-pod")

    @consumer.ordered(topics.KLINES, KlineEvent)
    async def handle(event: KlineEvent, entry_id: str) -> None:
        seen.append(event.open_time // 60_000)

    await start(consumer)
    try:
        await until(lambda: len(seen) == 16)
        assert seen == list(range(4, 20))  # the 6 left pending first, then the live ones, once each
        assert (await client.xpending(key, "features"))["pending"] == 0
    finally:
        await consumer.stop()
        await client.aclose()


async def test_a_handler_bug_is_dead_lettered_after_a_few_tries_and_the_stream_moves_on(redis_url):
    seen: list[int] = []
    consumer = Bus("features", redis_url, consumer="c")

    @consumer.ordered(topics.KLINES, KlineEvent)
    async def handle(event: KlineEvent, entry_id: str) -> None:
        if event.open_time == 2 * 60_000:
            raise ZeroDivisionError("a bug")  # BUG_LINE
        seen.append(event.open_time // 60_000)

    client = aioredis.Redis.from_url(redis_url)
    await add(client, 5)
    await start(consumer)
    try:
        await until(lambda: len(seen) == 4)
        assert seen == [0, 1, 3, 4]
        (letter,) = await read_topic(redis_url, topics.DEAD_LETTERS)
        # the traceback's last line, and where it was raised
        reason = letter["reason"]
        assert reason.startswith(f"handler failed {failures.HANDLER_ATTEMPTS} times: ZeroDivisionError: a bug (at ")
        assert reason.endswith("test_bus_ordered.py:" + str(BUG_LINE) + " in handle)")
        assert KlineEvent.from_json(letter["payload"]).open_time == 2 * 60_000  # nothing lost
    finally:
        await consumer.stop()
        await client.aclose()
