"""The issue's "Done when": over a replay with repeated disconnects, a forced rotation, a
serverShutdown, silent stretches and REST 429s, klines.v1 holds exactly the replayed closed
candles, each once, in order per stream, with the missing ones backfilled."""

from __future__ import annotations

import pytest

import asyncio

from prometheus_client import REGISTRY

from services.ingest.app import create
from services.ingest.simulator import FaultPlan

from ingest_support import begin_when_connected, simulator, expected_by_stream, ingest_settings, keys_by_stream, running, shipped_candles, wait_for_count

pytestmark = pytest.mark.slow


def metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_faulty_exchange_still_yields_every_closed_candle_once_in_order(redis_url, tmp_path):
    n = 120
    candles = shipped_candles(n)
    faults = FaultPlan(
        drop_at=[10, 35],
        shutdown_at=[22],
        silence=[(45, 52)],  # one stream goes quiet while the others flow
        silence_streams=["ethusdt@kline_1m"],
        duplicate_every=7,
        late_every=9,
        out_of_order_at=[60],
        malformed_at=[66],
        impossible_at=[70],
        rest_429_at=[1, 4],
        ping_interval_s=0.3,
    )
    gaps_before = {r: metric("klinebus_ingest_gaps_total", reason=r) for r in ("jump", "reconnect", "silence", "shutdown", "rotation")}
    rest_before = metric("klinebus_ingest_backfilled_candles_total", interval="1m")
    async with simulator(candles, speed=900, updates_per_candle=2, faults=faults) as sim:
        # 15 candles per second: a proactive rotation every ~2.5 s, a whole-connection silence at 78-100
        sim.faults.silence.append((78, 100))
        settings = ingest_settings(sim, tmp_path, rotate_after_s=2.5, silence_timeout_s=0.6)
        runtime = create(settings, redis_url)
        async with running(runtime):
            await begin_when_connected(sim)
            await sim.wait_done()
            events = await wait_for_count(redis_url, n * 3, timeout=30)
            stats = sim.stats
    assert keys_by_stream(events) == expected_by_stream(candles)
    by_key = {(k.symbol, k.open_time): k for ks in candles.values() for k in ks}
    assert all(e["close"] == by_key[(e["symbol"], e["open_time"])].close for e in events)
    sources = {e["source"] for e in events}
    assert sources == {"ws", "rest"}, "some candles must have come from the REST backfill"
    # the exchange saw a client that followed its rules
    assert stats.rest_429 >= 2 and stats.rest_418 == 0
    assert stats.pongs_ok >= 1 and stats.pongs_bad == 0
    assert stats.rate_limit_disconnects == 0
    assert stats.connections_opened >= 5  # start, 2 drops, shutdown, rotation(s), silence
    gaps = {r: metric("klinebus_ingest_gaps_total", reason=r) - gaps_before[r] for r in gaps_before}
    assert gaps["silence"] >= 1, gaps
    assert sum(gaps.values()) >= 3, gaps
    assert metric("klinebus_ingest_backfilled_candles_total", interval="1m") - rest_before == sum(
        1 for e in events if e["source"] == "rest"
    )


async def test_restart_continues_where_it_left_off_without_duplicates(redis_url, tmp_path):
    n = 60
    candles = shipped_candles(n, symbols=("BTCUSDT", "SOLUSDT"))
    # 0.2 s per candle: slow enough that the first run stops well before the replay ends, even on a
    # loaded machine (checked below, so an overloaded run fails loudly instead of passing vacuously).
    async with simulator(candles, speed=300) as sim:
        first = create(ingest_settings(sim, tmp_path), redis_url)
        async with running(first):
            await begin_when_connected(sim)
            before = await wait_for_count(redis_url, 20, timeout=20)
        assert len(before) < n * 2 - 10, "the first run saw almost everything: nothing left to recover"
        down_at = sim.now_ms()
        while sim.now_ms() < down_at + 5 * 60_000:  # five candles close while ingest is down
            await asyncio.sleep(0.05)
        second = create(ingest_settings(sim, tmp_path), redis_url)
        async with running(second):
            await sim.wait_done()
            events = await wait_for_count(redis_url, n * 2, timeout=30)
    assert keys_by_stream(events) == expected_by_stream(candles)
    assert any(e["source"] == "rest" for e in events)


async def test_two_replicas_publish_each_candle_once(redis_url, tmp_path):
    n = 30
    candles = shipped_candles(n, symbols=("BTCUSDT", "ETHUSDT"))
    async with simulator(candles, speed=900, faults=FaultPlan(drop_at=[12])) as sim:
        a = create(ingest_settings(sim, tmp_path, consumer_name="a"), redis_url)
        b = create(ingest_settings(sim, tmp_path, consumer_name="b"), redis_url)
        async with running(a), running(b):
            await begin_when_connected(sim, clients=2)
            await sim.wait_done()
            events = await wait_for_count(redis_url, n * 2, timeout=30)
    assert keys_by_stream(events) == expected_by_stream(candles)
