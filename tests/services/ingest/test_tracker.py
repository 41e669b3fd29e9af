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


class _FlakyPublish:
    """A publish that fails its first ``failures`` calls (as Redis refusing, or a full pool)."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.published: list[tuple[int, str]] = []

    async def __call__(self, batch, source):
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError("Too many connections")
        self.published.extend((k.open_time, source) for k in batch)
        return [(True, k.open_time) for k in batch]


async def _run_until(tracker, condition, timeout: float = 10.0) -> None:
    worker = asyncio.create_task(tracker.run())
    try:
        deadline = time.monotonic() + timeout
        while not condition() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)


async def test_a_new_streams_failed_first_publish_is_retried_not_lost():
    """No history wanted (initial_candles=0) and nothing published yet: the failed candles are held
    and published on the retry, before the candle that arrived meanwhile."""
    (ks,) = shipped_candles(3, symbols=("BTCUSDT",)).values()
    publish = _FlakyPublish(failures=2)

    async def no_rest(*a, **kw):
        raise AssertionError("no REST wanted: the held candles are published from memory")

    metrics = RecordingMetrics()
    tracker = StreamTracker("BTCUSDT", "1m", None, publish, no_rest, metrics, retry_initial_s=0.01, retry_max_s=0.02)
    tracker.closed(ks[0])
    tracker.closed(ks[1])

    async def later():
        while publish.calls < 2:
            await asyncio.sleep(0.005)
        tracker.closed(ks[2])  # arrives while the first two wait for their retry

    feeder = asyncio.create_task(later())
    await _run_until(tracker, lambda: len(publish.published) == 3)
    await feeder
    assert publish.published == [(k.open_time, "ws") for k in ks]
    assert metrics.count("backfill_failures", "1m") == 2


async def test_a_failed_first_publish_after_the_initial_backfill_retries_the_whole_start():
    """With initial history wanted, a failed first publish used to clear the "needs history" flag,
    so the retry did nothing and the stream's history and first candle were lost for good."""
    candles = shipped_candles(12, symbols=("BTCUSDT",))
    (ks,) = candles.values()
    history, live = ks[:11], ks[11]
    publish = _FlakyPublish(failures=1)

    async def fetch_recent(symbol, interval, count, end):
        return [k for k in history if end is None or k.open_time <= end][-count:]

    async def fetch(symbol, interval, start, end):
        return [k for k in history if start <= k.open_time and (end is None or k.open_time <= end)]

    metrics = RecordingMetrics()
    tracker = StreamTracker(
        "BTCUSDT", "1m", None, publish, fetch, metrics, fetch_recent=fetch_recent, initial_candles=5,
        retry_initial_s=0.01, retry_max_s=0.02,
    )
    tracker.closed(live)
    await _run_until(tracker, lambda: len(publish.published) == 6)
    assert publish.published == [(k.open_time, "rest") for k in ks[6:11]] + [(live.open_time, "ws")]


async def test_held_candles_add_up_over_streams_and_clear_once_published():
    """held_candles is one gauge for every stream: a stream that published fine used to set it to
    its own 0 while another still held candles after a failed publish, hiding them from the alert."""
    (btc,) = shipped_candles(2, symbols=("BTCUSDT",)).values()
    (eth,) = shipped_candles(2, symbols=("ETHUSDT",)).values()
    metrics = RecordingMetrics()

    async def no_rest(*a, **kw):
        raise AssertionError("no REST wanted")

    async def nothing_new(*a, **kw):  # the catch-up below finds no candle beyond the held ones
        return []

    failing = _FlakyPublish(failures=10**6)  # Redis refuses this stream's publishes for now
    held = StreamTracker("BTCUSDT", "1m", None, failing, nothing_new, metrics, retry_initial_s=60, retry_max_s=60)
    fine = _FlakyPublish(failures=0)
    healthy = StreamTracker("ETHUSDT", "1m", None, fine, no_rest, metrics)
    held.closed(btc[0])
    held.closed(btc[1])
    await _run_until(held, lambda: failing.calls >= 1 and metrics.count("held_candles") == 2)
    assert metrics.count("held_candles") == 2
    healthy.closed(eth[0])
    healthy.closed(eth[1])
    await _run_until(healthy, lambda: len(fine.published) == 2)
    assert metrics.count("held_candles") == 2  # the other stream's candles are still waiting
    failing.failures = 0  # Redis takes writes again: the retry publishes them
    held.catch_up("retry")
    await _run_until(held, lambda: len(failing.published) == 2)
    assert failing.published == [(k.open_time, "ws") for k in btc]
    assert metrics.count("held_candles") == 0
