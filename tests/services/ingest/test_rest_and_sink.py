"""REST paging (newest history, backwards beyond one page) and batched once-per-candle publishing."""

from __future__ import annotations

import orjson

from libs.common import topics
from libs.common.bus import redis_client
from services.ingest.rest import RestKlines
from services.ingest.simulator import ExchangeSimulator
from services.ingest.sink import KlineSink

from ingest_support import read_klines, shipped_candles


async def test_recent_closed_klines_pages_backwards_past_one_request():
    candles = shipped_candles(2500, symbols=("BTCUSDT",))
    (ks,) = candles.values()
    # at this speed the whole replay has closed by the first request: all of it is history
    async with ExchangeSimulator(candles, speed=10_000_000.0, updates_per_candle=0) as sim:
        await sim.wait_done()
        rest = RestKlines(sim.rest_url)
        try:
            newest = await rest.recent_closed_klines("BTCUSDT", "1m", 1500)
            everything = await rest.recent_closed_klines("BTCUSDT", "1m", 5000)
            before = await rest.recent_closed_klines("BTCUSDT", "1m", 3, end=ks[100].open_time)
            requests = sim.stats.rest_requests
        finally:
            await rest.close()
    assert newest == ks[-1500:]  # 1000 + 500: two pages, joined in order
    assert everything == ks  # asked for more than there is: all of it, no error
    assert before == ks[98:101]  # open_time <= end, inclusive
    assert requests == 2 + 3 + 1


async def test_sink_publishes_a_batch_once_and_in_order(redis_url):
    candles = shipped_candles(2100, symbols=("BTCUSDT", "ETHUSDT"))
    btc, eth = candles[("BTCUSDT", "1m")], candles[("ETHUSDT", "1m")]
    redis = redis_client(redis_url)
    sink = KlineSink(redis, maxlen=1_000_000, live_maxlen=100)
    try:
        first = await sink.publish_closed(btc[:3], "ws")
        # a replica already published btc[0..2]; a replay re-sends btc[1], then a backfill page
        # longer than one Lua call, interleaved with another stream and one stale candle
        batch = [btc[1], eth[0], *btc[3:2100], eth[1], btc[5]]
        results = await sink.publish_closed(batch, "rest")
        last = await sink.last_open_times()
    finally:
        await redis.aclose()
    assert first == [(True, k.open_time) for k in btc[:3]]
    assert results[0] == (False, btc[2].open_time)
    assert results[1] == (True, eth[0].open_time)
    assert results[2:-2] == [(True, k.open_time) for k in btc[3:2100]]
    assert results[-2] == (True, eth[1].open_time)
    assert results[-1] == (False, btc[2099].open_time)
    events = await read_klines(redis_url, topics.KLINES)
    assert [(e["symbol"], e["open_time"]) for e in events] == (
        [("BTCUSDT", k.open_time) for k in btc[:3]]
        + [("ETHUSDT", eth[0].open_time)]
        + [("BTCUSDT", k.open_time) for k in btc[3:2100]]
        + [("ETHUSDT", eth[1].open_time)]
    )
    assert [e["close"] for e in events[4:7]] == [k.close for k in btc[3:6]]
    assert last == {("BTCUSDT", "1m"): btc[2099].open_time, ("ETHUSDT", "1m"): eth[1].open_time}


async def test_sink_writes_each_candle_to_its_keys_partition(redis_url):
    """With klines.v1 split in partitions, each key's candles land in its own partition's
    stream, in order, once (a re-sent candle refused there too), and nowhere else."""
    import zlib

    partitions = 4
    candles = shipped_candles(50, symbols=("BTCUSDT", "ETHUSDT", "SOLUSDT"))
    redis = redis_client(redis_url)
    sink = KlineSink(redis, maxlen=1_000_000, live_maxlen=100, partitions=partitions)
    try:
        for ks in candles.values():
            await sink.publish_closed(ks, "rest")
        again = await sink.publish_closed([ks[-1] for ks in candles.values()], "ws")
        per_stream = {p: [orjson.loads(f[b"__data__"]) for _, f in await redis.xrange(topics.stream_key(topics.KLINES, p))]
                      for p in range(partitions)}
    finally:
        await redis.aclose()
    assert [appended for appended, _ in again] == [False, False, False]
    for (symbol, interval), ks in candles.items():
        home = zlib.crc32(f"{symbol}:{interval}".encode()) % partitions  # the documented routing, spelled out
        for p, events in per_stream.items():
            mine = [e["open_time"] for e in events if e["symbol"] == symbol]
            assert mine == ([k.open_time for k in ks] if p == home else []), (symbol, p)


async def test_sink_waits_out_redis_refusing_writes_and_loses_nothing(redis_url):
    """Redis out of memory under ``noeviction`` refuses every write for a while: the sink says so
    once, keeps the batch, and publishes it when Redis takes writes again."""
    import asyncio
    import time

    from metrics_fake import RecordingMetrics

    (btc,) = shipped_candles(5, symbols=("BTCUSDT",)).values()
    admin = redis_client(redis_url)
    redis = redis_client(redis_url)
    metrics = RecordingMetrics()
    sink = KlineSink(redis, maxlen=1000, live_maxlen=100, metrics=metrics)
    saved = await admin.config_get("maxmemory*")
    try:
        await sink.publish_closed(btc[:1], "ws")  # the script is loaded and the stream exists
        await admin.config_set("maxmemory-policy", "noeviction")
        await admin.config_set("maxmemory", "1")  # every write is now refused with OOM
        publishing = asyncio.create_task(sink.publish_closed(btc[1:], "ws"))
        deadline = time.monotonic() + 30
        while metrics.count("publish_stalled") != 1:
            assert time.monotonic() < deadline and not publishing.done(), publishing
            await asyncio.sleep(0.02)
        # nothing got in meanwhile
        assert [e["open_time"] for e in await read_klines(redis_url, topics.KLINES)] == [btc[0].open_time]
        await admin.config_set("maxmemory", saved.get("maxmemory", "0"))
        results = await asyncio.wait_for(publishing, 30)
    finally:
        await admin.config_set("maxmemory", saved.get("maxmemory", "0"))
        await admin.config_set("maxmemory-policy", saved.get("maxmemory-policy", "noeviction"))
        await sink.close()
        await redis.aclose()
        await admin.aclose()
    assert results == [(True, k.open_time) for k in btc[1:]]
    assert [e["open_time"] for e in await read_klines(redis_url, topics.KLINES)] == [k.open_time for k in btc]
    assert metrics.count("publish_stalled") == 0
    assert sum(v for (name, _), v in metrics.counts.items() if name == "publish_retries") >= 1
