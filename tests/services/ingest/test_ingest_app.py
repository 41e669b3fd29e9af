"""Simulator -> ingest -> klines.v1 on a real Redis: every replayed closed candle exactly once, in order."""

from __future__ import annotations

from libs.common import topics
from services.ingest.app import create
from services.ingest.simulator import FaultPlan

from ingest_support import begin_when_connected, simulator, expected_by_stream, ingest_settings, keys_by_stream, read_klines, running, shipped_candles, wait_for_count


async def test_replay_yields_each_closed_candle_once_in_order(redis_url, tmp_path):
    candles = shipped_candles(20)
    async with simulator(candles, speed=1200, updates_per_candle=2) as sim:
        runtime = create(ingest_settings(sim, tmp_path), redis_url)
        async with running(runtime):
            await begin_when_connected(sim)
            await sim.wait_done()
            events = await wait_for_count(redis_url, 60)
    assert keys_by_stream(events) == expected_by_stream(candles)
    by_key = {(k.symbol, k.interval, k.open_time): k for ks in candles.values() for k in ks}
    for e in events:
        k = by_key[(e["symbol"], e["interval"], e["open_time"])]
        assert (e["open"], e["high"], e["low"], e["close"], e["volume"]) == (k.open, k.high, k.low, k.close, k.volume)
        assert e["close_time"] == k.close_time


async def test_malformed_and_impossible_messages_go_to_dead_letters_and_ingest_keeps_going(redis_url, tmp_path):
    candles = shipped_candles(12, symbols=("BTCUSDT",))
    faults = FaultPlan(malformed_at=[3], impossible_at=[5])
    async with simulator(candles, speed=1200, faults=faults) as sim:
        runtime = create(ingest_settings(sim, tmp_path), redis_url)
        async with running(runtime):
            await begin_when_connected(sim)
            await sim.wait_done()
            events = await wait_for_count(redis_url, 12)
    assert keys_by_stream(events) == expected_by_stream(candles)
    dead = await read_klines(redis_url, topics.DEAD_LETTERS)
    reasons = [d["reason"] for d in dead]
    assert len(dead) == 2, reasons
    assert reasons[0].startswith("malformed JSON")
    assert "high" in reasons[1] and "< low" in reasons[1]
    assert all(d["source"] == "binance-ws" and d["service"] == "ingest" for d in dead)
