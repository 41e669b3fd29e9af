"""Reading a stream's recent candles back from klines.v1 (real Redis)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import redis.asyncio as aioredis

from libs.common import stream_history
from libs.common.contracts import KlineEvent
from libs.common.klines import read_kline_csv
from tests.streams import add_events

DATA = next((Path(__file__).resolve().parents[3] / "data" / "klines").glob("BTCUSDT-1m-*.csv.gz"))


async def test_scan_pages_back_skips_other_streams_and_stops_at_need(redis_url, monkeypatch):
    monkeypatch.setattr(stream_history, "PAGE", 7)  # many pages from a short stream
    btc = read_kline_csv(DATA, "BTCUSDT", "1m")[:50]
    eth = [replace(k, symbol="ETHUSDT") for k in btc]
    events = []
    for b, e in zip(btc, eth):
        events += [KlineEvent.from_kline(b, "replay"), KlineEvent.from_kline(e, "replay")]
    await add_events(redis_url, events)
    client = aioredis.Redis.from_url(redis_url)
    try:
        got = await stream_history.recent_candles(client, "BTCUSDT", "1m", 20, before=btc[45].open_time)
        await add_events(redis_url, [KlineEvent.from_kline(btc[10], "replay")])  # a redelivered copy
        everything = await stream_history.recent_candles(client, "BTCUSDT", "1m", 500, before=btc[45].open_time)
        none = await stream_history.recent_candles(client, "BTCUSDT", "15m", 20, before=btc[45].open_time)
    finally:
        await client.aclose()
    assert got == btc[25:45]
    assert everything == btc[:45]
    assert none == []


async def test_all_history_and_invalid_entries(redis_url):
    btc = read_kline_csv(DATA, "BTCUSDT", "1m")[:30]
    await add_events(redis_url, [KlineEvent.from_kline(k, "replay") for k in btc[:15]])
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.xadd("klinebus:{klines.v1}", {"__data__": b"{not json"})  # dead-lettered long ago
        await add_events(redis_url, [KlineEvent.from_kline(k, "replay") for k in btc[15:]])
        got = await stream_history.recent_candles(client, "BTCUSDT", "1m", None, before=btc[25].open_time)
    finally:
        await client.aclose()
    assert got == btc[:25]


async def test_a_key_is_read_back_from_its_own_partition(redis_url):
    from libs.common import topics
    from libs.common.bus import OncePerCandle

    parts = 4
    btc = read_kline_csv(DATA, "BTCUSDT", "1m")[:20]
    others = [replace(k, symbol=s) for s in ("ETHUSDT", "BNBUSDT", "SOLUSDT") for k in btc]
    client = aioredis.Redis.from_url(redis_url)
    try:
        guard = OncePerCandle(client, topics.KLINES, 1000, partitions=parts)
        await guard.publish_many([KlineEvent.from_kline(k, "replay") for k in [*btc, *others]])
        p = topics.partition_of("BTCUSDT", "1m", parts)
        assert p != 0  # pinned by crc32: the old single-stream read would find nothing
        got = await stream_history.recent_candles(client, "BTCUSDT", "1m", 5, before=btc[10].open_time,
                                                  partitions=parts)
        unpartitioned = await stream_history.recent_candles(client, "BTCUSDT", "1m", 5, before=btc[10].open_time)
    finally:
        await client.aclose()
    assert got == btc[5:10]
    assert unpartitioned == []
