"""Reading a stream's recent candles back from klines.v1 (real Redis)."""

from __future__ import annotations

from dataclasses import replace

import redis.asyncio as aioredis

from libs.common.contracts import KlineEvent
from libs.common.klines import read_kline_csv
from services.charts import backfill
from services.charts.history import CandleHistory

from tests.streams import add_events

from .conftest import DATA


async def test_scan_pages_back_skips_other_streams_and_stops_at_need(redis_url, monkeypatch):
    monkeypatch.setattr(backfill, "PAGE", 7)  # many pages from a short stream
    btc = read_kline_csv(DATA, "BTCUSDT", "1m")[:50]
    eth = [replace(k, symbol="ETHUSDT") for k in btc]
    events = []
    for b, e in zip(btc, eth):
        events += [KlineEvent.from_kline(b, "replay"), KlineEvent.from_kline(e, "replay")]
    await add_events(redis_url, events)
    client = aioredis.Redis.from_url(redis_url)
    try:
        got = await backfill.recent_candles(client, "BTCUSDT", "1m", 20, before=btc[45].open_time)
        await add_events(redis_url, [KlineEvent.from_kline(btc[10], "replay")])  # a redelivered copy
        everything = await backfill.recent_candles(client, "BTCUSDT", "1m", 500, before=btc[45].open_time)
        none = await backfill.recent_candles(client, "BTCUSDT", "15m", 20, before=btc[45].open_time)
    finally:
        await client.aclose()
    assert got == btc[25:45]
    assert everything == btc[:45]
    assert none == []


def test_merge_puts_older_candles_before_the_live_ones():
    klines = read_kline_csv(DATA, "BTCUSDT", "1m")[:10]
    h = CandleHistory(capacity=8)
    h.add(klines[9])
    assert h.merge(klines[:9]) == 9
    assert h.count("BTCUSDT", "1m") == 8
    assert [r[0] for r in h._rows[("BTCUSDT", "1m")]] == [k.open_time for k in klines[2:]]
    assert not h.add(klines[5])  # an older candle after the merge still changes nothing
