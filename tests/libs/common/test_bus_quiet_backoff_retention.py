"""Three promises of the bus edge that issue 9 found broken, each checked on a real Redis:

* consuming is quiet: no log line per event at INFO (before, faststream logged "Received" and
  "Processed" for every entry under ``klinebus.<service>.faststream``);
* an infrastructure failure in a handler is waited out with growing back-off and one line per
  state change (before: a warning every 0.1 s, the same delay each time);
* time-based retention: candle-keyed publishes trim with ``MINID ~`` beside the entry cap
  (before, only ``MAXLEN ~``: 200,000 entries was 50 minutes at 4,000 streams of 1m candles).
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
import redis.asyncio as aioredis
import redis.exceptions as rex

from libs.common import topics
from libs.common.bus import DATA_FIELD, Bus, failures
from libs.common.contracts import ChartRequest, FeaturesEvent, KlineEvent

pytestmark = pytest.mark.timeout(120)

EVENTS = 60
FAILURES = 8
HOUR_MS = 3_600_000


def kline(i: int) -> KlineEvent:
    t = i * 60_000
    return KlineEvent(symbol="BTCUSDT", interval="1m", open_time=t, close_time=t + 59_999,
                      open=100.0, high=101.0, low=99.0, close=100.5, volume=3.0)


async def until(predicate, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def klinebus_records(caplog, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("klinebus") and r.levelno >= level]


async def test_consuming_logs_nothing_per_event_at_info(redis_url, caplog):
    ordered_seen: list[int] = []
    competing_seen: list[str] = []
    bus = Bus("features", redis_url, consumer="c")

    @bus.ordered(topics.KLINES, KlineEvent)
    async def on_kline(event: KlineEvent, entry_id: str) -> None:
        ordered_seen.append(event.open_time)

    @bus.competing(topics.CHART_REQUESTS)
    async def on_request(event: ChartRequest) -> None:
        competing_seen.append(event.requested_by)

    client = aioredis.Redis.from_url(redis_url)
    try:
        for i in range(EVENTS):
            await client.xadd(topics.stream_key(topics.KLINES), {DATA_FIELD: kline(i).to_json()})
            request = ChartRequest(symbol="BTCUSDT", interval="1m", requested_by=f"r{i}")
            await client.xadd(topics.stream_key(topics.CHART_REQUESTS), {DATA_FIELD: request.to_json()})
        caplog.set_level(logging.INFO)
        await bus.start()
        try:
            await until(lambda: len(ordered_seen) == EVENTS and len(competing_seen) == EVENTS)
        finally:
            await bus.stop()
    finally:
        await client.aclose()
    lines = klinebus_records(caplog, logging.INFO)
    # start, ownership, stop: a handful of lines whatever the volume, never one per event
    assert len(lines) < EVENTS // 4, [f"{r.name}: {r.getMessage()}" for r in lines[:6]]


async def test_an_infrastructure_failure_is_waited_out_with_growing_back_off_and_one_line(
    redis_url, caplog, monkeypatch
):
    # 10 ms doubling, capped at 1 s: eight tries take about two seconds
    monkeypatch.setattr(failures, "INFRA_FIRST_S", 0.01)
    monkeypatch.setattr(failures, "INFRA_MAX_S", 1.0)
    calls: list[float] = []
    seen: list[int] = []
    bus = Bus("features", redis_url, consumer="c")

    @bus.ordered(topics.KLINES, KlineEvent)
    async def on_kline(event: KlineEvent, entry_id: str) -> None:
        if event.open_time == 0 and len(calls) < FAILURES:
            calls.append(time.monotonic())
            raise rex.ConnectionError("Connection reset by peer")  # Redis went away while publishing
        seen.append(event.open_time // 60_000)

    client = aioredis.Redis.from_url(redis_url)
    try:
        for i in range(3):
            await client.xadd(topics.stream_key(topics.KLINES), {DATA_FIELD: kline(i).to_json()})
        caplog.set_level(logging.INFO)
        await bus.start()
        try:
            await until(lambda: len(seen) == 3)
        finally:
            await bus.stop()
    finally:
        await client.aclose()
    assert seen == [0, 1, 2]  # waited out in place: nothing skipped, nothing overtook it
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    # capped exponential back-off: the last waits are several times the first (the same delay
    # every time would keep this ratio near 1)
    assert (gaps[-1] + gaps[-2]) > 4 * (gaps[0] + gaps[1]), gaps
    warnings = [r.getMessage() for r in klinebus_records(caplog, logging.WARNING)]
    # one line when the stall starts (and one at INFO when it ends), not one per try
    assert len(warnings) <= 2, warnings


async def _old_entries(client, stream: str, n: int, age_ms: int) -> None:
    """``n`` entries whose ids say they were appended ``age_ms`` ago (ids are milliseconds)."""
    base = int(time.time() * 1000) - age_ms
    for i in range(n):
        await client.xadd(stream, {DATA_FIELD: b"{}"}, id=f"{base}-{i + 1}")


async def _older_than(client, stream: str, cutoff_ms: int) -> int:
    return len(await client.xrange(stream, "-", f"{cutoff_ms - 1}"))


async def test_candle_keyed_publishes_trim_by_time_beside_the_entry_cap(redis_url):
    stream = topics.stream_key(topics.FEATURES)
    client = aioredis.Redis.from_url(redis_url)
    try:
        node = int((await client.config_get("stream-node-max-entries"))["stream-node-max-entries"])
        await _old_entries(client, stream, 3 * node, 2 * HOUR_MS)  # two hours old
        await _old_entries(client, stream, 1, HOUR_MS // 2)  # half an hour old: within retention
        bus = Bus("features", redis_url, consumer="c", stream_retention_ms=HOUR_MS)
        bus.publisher(topics.FEATURES, FeaturesEvent)
        out = bus.once_per_candle(topics.FEATURES, client)
        await out.publish(FeaturesEvent(symbol="BTCUSDT", interval="1m", open_time=0, close=1.0,
                                        feature_set="x", values={}, warm=False))
        cutoff = int(time.time() * 1000) - HOUR_MS
        # MINID ~ frees whole stream nodes: at most one node of expired entries may remain
        assert await _older_than(client, stream, cutoff) < node
        assert await client.xlen(stream) <= node + 2
        newest = await client.xrevrange(stream, count=2)
        assert b'"open_time":0' in newest[0][1][DATA_FIELD.encode()]
        assert int(newest[1][0].split(b"-")[0]) >= cutoff  # the half-hour-old entry is kept
    finally:
        await client.aclose()
