from __future__ import annotations

import pytest

from services.charts.cadence import Cadence, ChartJob


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_schedule_every_period():
    clock = Clock()
    c = Cadence(600, clock=clock)
    c.track("BTCUSDT", "1m")
    assert c.tick() == 1 and c.next_job() == ChartJob("BTCUSDT", "1m", "analysis")
    clock.t += 599
    assert c.tick() == 0 and c.next_job() is None
    assert c.seconds_to_next() == pytest.approx(1)
    clock.t += 1
    assert c.tick() == 1 and c.next_job() is not None


def test_behind_keeps_only_latest_pending_and_counts_skips():
    clock = Clock()
    c = Cadence(600, clock=clock)
    c.track("BTCUSDT", "1m")
    c.track("ETHUSDT", "1m")
    c.tick()
    # nothing rendered for 35 minutes: three more ticks passed, one job per key waits
    clock.t += 35 * 60
    c.tick()
    assert len(c) == 2
    assert c.stats.replaced == 2  # the first tick's jobs were superseded
    assert c.stats.missed_ticks == 2 * 2  # 600..2100 s: ticks at 600 and 1200 folded into the one at 1800
    assert c.stats.skipped == 6
    # an on-demand request for BTC replaces BTC's pending job and keeps its place in the queue
    c.enqueue(ChartJob("BTCUSDT", "1m", "analysis", 120, "request", "test"))
    assert c.stats.replaced == 3
    first = c.next_job()
    assert first.symbol == "BTCUSDT" and first.reason == "request" and first.window == 120
    assert c.next_job().symbol == "ETHUSDT"
    assert c.next_job() is None
    assert c.stats.by_key[("BTCUSDT", "1m", "analysis")] == 1 + 2 + 1


def test_requests_of_different_presets_do_not_replace_each_other():
    c = Cadence(600, clock=Clock())
    c.enqueue(ChartJob("BTCUSDT", "1m", "analysis", reason="request"))
    c.enqueue(ChartJob("BTCUSDT", "1m", "classifier224", reason="request"))
    assert len(c) == 2 and c.stats.replaced == 0


def test_bad_period():
    with pytest.raises(ValueError, match="cadence must be > 0"):
        Cadence(0)
