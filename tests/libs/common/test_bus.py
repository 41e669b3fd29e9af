"""The bus edge against a real Redis: groups, dead letters, caps, reclaiming, plain-JSON entries."""

import asyncio

import orjson
import pytest
import redis.asyncio as aioredis

from libs.common import topics
from libs.common.bus import Bus
from libs.common.contracts import DeadLetter, FeaturesEvent, KlineEvent


def kline_event(open_time: int, symbol: str = "BTCUSDT") -> KlineEvent:
    return KlineEvent(
        symbol=symbol, interval="1m", open_time=open_time, close_time=open_time + 59_999,
        open=100.0, high=101.0, low=99.0, close=100.5, volume=3.0,
    )


async def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def entries(client, topic):
    return [orjson.loads(f[b"__data__"]) for _, f in await client.xrange(topics.stream_key(topic))]


async def test_entries_are_plain_json_and_groups_start_at_the_beginning(redis_url):
    producer = Bus("ingest", redis_url, consumer="p")
    producer.publisher(topics.KLINES, KlineEvent)
    await producer.broker.start()
    # Published before the consumer exists: a group created at "$" would never see these.
    for i in range(3):
        await producer.publish(kline_event(i * 60_000))

    seen: list[int] = []
    consumer = Bus("features", redis_url, consumer="c")

    @consumer.competing(topics.KLINES)
    async def handle(event: KlineEvent) -> None:
        seen.append(event.open_time)

    await consumer.start()
    client = aioredis.Redis.from_url(redis_url)
    try:
        async def all_seen():
            return len(seen) == 3
        await wait_for(all_seen)
        assert seen == [0, 60_000, 120_000]
        raw = await entries(client, topics.KLINES)
        assert [e["open_time"] for e in raw] == [0, 60_000, 120_000]
        assert KlineEvent.model_validate(raw[0]) == kline_event(0).model_copy(update={"ingested_at": raw[0]["ingested_at"]})
        pending = await client.xpending(topics.stream_key(topics.KLINES), "features")
        assert pending["pending"] == 0  # every handled entry is acknowledged
    finally:
        await consumer.stop()
        await producer.broker.stop()
        await client.aclose()


async def test_bad_messages_go_to_dead_letters_and_the_stream_moves_on(redis_url):
    consumer = Bus("features", redis_url, consumer="c")
    seen: list[int] = []

    @consumer.competing(topics.KLINES)
    async def handle(event: KlineEvent) -> None:
        seen.append(event.open_time)

    client = aioredis.Redis.from_url(redis_url)
    key = topics.stream_key(topics.KLINES)
    await client.xadd(key, {"__data__": b"{not json"})
    await client.xadd(key, {"__data__": orjson.dumps({**kline_event(0).model_dump(), "symbol": "btc"})})
    await client.xadd(key, {"__data__": orjson.dumps({**kline_event(0).model_dump(), "interval": "7m"})})
    await client.xadd(key, {"__data__": kline_event(60_000).to_json()})
    await consumer.start()
    try:
        async def done():
            return seen == [60_000] and await client.xlen(topics.stream_key(topics.DEAD_LETTERS)) == 3
        await wait_for(done)
        letters = [DeadLetter.model_validate(e) for e in await entries(client, topics.DEAD_LETTERS)]
        reasons = [d.reason for d in letters]
        assert reasons[0].startswith("malformed JSON")
        assert "symbol must be upper-case" in reasons[1]
        assert "unknown interval '7m'" in reasons[2]
        assert all("\n" not in r for r in reasons)
        assert letters[0].payload == "{not json"  # the message as received, nothing lost
        assert {d.source for d in letters} == {topics.KLINES} and {d.service for d in letters} == {"features"}
        assert (await client.xpending(key, "features"))["pending"] == 0
        metric = consumer.metrics.dead_letters.labels(topics.KLINES, "malformed_JSON")._value.get()
        assert metric >= 1
    finally:
        await consumer.stop()
        await client.aclose()


async def test_transient_failures_stay_pending_and_are_reclaimed(redis_url):
    """An exception that is not bad input leaves the entry pending; the reclaimer retries it."""
    attempts: list[int] = []
    consumer = Bus("inference", redis_url, consumer="c", reclaim_idle_ms=300)

    @consumer.competing(topics.FEATURES)
    async def handle(event: FeaturesEvent) -> None:
        attempts.append(event.open_time)
        if len(attempts) == 1:
            raise ConnectionError("model store unreachable")

    client = aioredis.Redis.from_url(redis_url)
    event = FeaturesEvent(symbol="BTCUSDT", interval="1m", open_time=0, close=1.0, feature_set="x", values={}, warm=False)
    await client.xadd(topics.stream_key(topics.FEATURES), {"__data__": event.to_json()})
    await consumer.start()
    try:
        async def retried():
            return len(attempts) >= 2
        await wait_for(retried, timeout=15)
        assert attempts[:2] == [0, 0]
        assert await client.xlen(topics.stream_key(topics.DEAD_LETTERS)) == 0

        async def acked():
            return (await client.xpending(topics.stream_key(topics.FEATURES), "inference"))["pending"] == 0
        await wait_for(acked)
    finally:
        await consumer.stop()
        await client.aclose()


async def test_every_publish_caps_its_stream(redis_url):
    bus = Bus("ingest", redis_url, consumer="p", stream_maxlen=100)
    bus.publisher(topics.KLINES, KlineEvent)
    await bus.broker.start()
    client = aioredis.Redis.from_url(redis_url)
    try:
        for i in range(1000):
            await bus.publish(kline_event(i * 60_000))
        length = await client.xlen(topics.stream_key(topics.KLINES))
        # MAXLEN ~ trims whole macro-nodes (100 entries by default), so "about 100", never 1000.
        assert 100 <= length <= 200
    finally:
        await bus.broker.stop()
        await client.aclose()


def test_publishing_an_undeclared_topic_is_a_clear_error():
    bus = Bus("ingest", "redis://localhost:1/0", consumer="p")
    with pytest.raises(KeyError, match="no publisher for klines.v1"):
        asyncio.run(bus.publish(kline_event(0)))


def test_stream_keys_carry_a_hash_tag_per_topic():
    assert topics.stream_key(topics.KLINES) == "klinebus:{klines.v1}"
    assert topics.stream_companion_key(topics.KLINES, "dedupe") == "klinebus:{klines.v1}:dedupe"
    with pytest.raises(ValueError, match="unknown topic"):
        topics.stream_key("klines")


async def test_competing_batch_dead_letters_one_bad_entry_and_keeps_its_batch(redis_url):
    consumer = Bus("archive", redis_url, consumer="c")
    batches: list[list[int]] = []

    @consumer.competing_batch(topics.KLINES, KlineEvent, max_records=100)
    async def handle(events: list[KlineEvent]) -> None:
        batches.append([e.open_time for e in events])

    client = aioredis.Redis.from_url(redis_url)
    key = topics.stream_key(topics.KLINES)
    for i in range(5):
        await client.xadd(key, {"__data__": kline_event(i * 60_000).to_json()})
        if i == 2:
            await client.xadd(key, {"__data__": b'{"symbol": "BTCUSDT"}'})
    await consumer.start()
    try:
        async def done():
            return sum(map(len, batches)) == 5 and await client.xlen(topics.stream_key(topics.DEAD_LETTERS)) == 1
        await wait_for(done)
        assert [t for b in batches for t in b] == [i * 60_000 for i in range(5)]
        assert len(batches) < 5  # read as batches, not one by one
        (letter,) = await entries(client, topics.DEAD_LETTERS)
        assert letter["reason"].startswith("KlineEvent: interval: Field required")
        assert (await client.xpending(key, "archive"))["pending"] == 0
    finally:
        await consumer.stop()
        await client.aclose()


async def test_a_competing_reader_ahead_of_a_reclaim_hands_every_entry_over_once(redis_url):
    """A backlog makes the consumer read the next batch before handling this one; a reclaim of a
    dead replica's entries reads this consumer's pending entries too. Neither may hand an entry
    over twice, nor skip one."""
    client = aioredis.Redis.from_url(redis_url)
    key = topics.stream_key(topics.KLINES)
    try:
        await client.xgroup_create(key, "archive", id="0", mkstream=True)
        for i in range(40):  # a dead replica read these and never acknowledged them
            await client.xadd(key, {"__data__": kline_event(i * 60_000, "DEADUSDT").to_json()})
        await client.xreadgroup("archive", "dead", {key: ">"}, count=40)
        for i in range(600):  # and a backlog behind them
            await client.xadd(key, {"__data__": kline_event(i * 60_000).to_json()})
        seen: list[tuple[str, int]] = []
        consumer = Bus("archive", redis_url, consumer="live", reclaim_idle_ms=200)

        @consumer.competing_batch(topics.KLINES, KlineEvent, max_records=7)
        async def handle(events) -> None:
            seen.extend((e.symbol, e.open_time) for e in events)
            await asyncio.sleep(0.005)  # slow enough that reclaims fall due while the backlog drains

        await consumer.start()
        try:
            async def done():
                pending = await client.xpending(key, "archive")
                return len(seen) >= 640 and pending["pending"] == 0
            await wait_for(done, timeout=30)
        finally:
            await consumer.stop()
        assert len(seen) == len(set(seen)) == 640
        assert sorted(t for s, t in seen if s == "BTCUSDT") == [i * 60_000 for i in range(600)]
        # The reclaim was not starved by the backlog (the handler's pauses make draining it take
        # ~0.5 s; a reclaim falls due every 50 ms once the dead replica's entries are 200 ms idle).
        assert seen.index(("DEADUSDT", 0)) < len(seen) - 100
    finally:
        await client.aclose()
