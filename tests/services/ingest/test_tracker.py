"""A failed catch-up backfill (restart, reconnect, rotation, silence) is counted and retried."""

from __future__ import annotations

import asyncio
import time

from ingest_support import shipped_candles, simulator
from metrics_fake import RecordingMetrics

from services.ingest import rest as rest_module
from services.ingest.rest import RestKlines
from services.ingest.simulator import FaultPlan
from services.ingest.tracker import StreamTracker


async def test_failed_catch_up_is_counted_and_retried_until_the_gap_is_filled(monkeypatch):
    monkeypatch.setattr(rest_module, "SERVER_ERROR_RETRIES", 0)  # RestKlines gives up at the first 500
    candles = shipped_candles(30, symbols=("BTCUSDT",))
    (ks,) = candles.values()
    last = ks[9].open_time  # published before the "restart"; 10..29 are the gap
    # the first two klines requests fail: the catch-up fails, then its first retry does too
    async with simulator(candles, speed=30_000, faults=FaultPlan(rest_500_at=[1, 2])) as sim:
        sim.begin()
        await sim.wait_done()  # every candle has closed on the exchange
        rest = RestKlines(sim.rest_url)
        published: list[tuple[int, str]] = []

        async def publish(batch, source):
            published.extend((k.open_time, source) for k in batch)
            return [(True, k.open_time) for k in batch]

        metrics = RecordingMetrics()
        tracker = StreamTracker(
            "BTCUSDT", "1m", last, publish, rest.closed_klines, metrics, retry_initial_s=0.01, retry_max_s=0.05
        )
        worker = asyncio.create_task(tracker.run())
        try:
            tracker.catch_up("restart")  # no live candle follows: only the retry can fill the gap
            deadline = time.monotonic() + 10
            while len(published) < 20 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        finally:
            worker.cancel()
            await rest.close()
        assert sim.stats.rest_500 == 2
    assert published == [(k.open_time, "rest") for k in ks[10:]]
    assert metrics.count("backfill_failures", "1m") == 2
    assert metrics.count("gaps", "retry") == 1
