"""The warm-up release is atomic with respect to the checkpoint (issue 21): a raise or a kill
(a stop that cancels it) at any step of releasing a new key's held candles, then a restart,
publishes every held candle exactly once.

The steps, in order: the held candles applied to the state, their events published, the key
recorded as no longer waiting. Before the fix a failure after the first step saved a snapshot
holding the candles while the checkpoint pointed before them: the restart's replay found them
duplicates and the new key's first candles never appeared on features.v1."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest

from klinebus.pipeline import build_runtime
from libs.common import topics
from libs.common.archive import ParquetArchive
from libs.common.bus import OncePerCandle
from libs.common.contracts import KlineEvent
from libs.common.klines import read_kline_csv
from libs.indicators.batch import compute_batch
from libs.indicators.streaming import StreamingEngine
from services.features import checkpoint
from tests.candles import BTC_15M
from tests.streams import add_events, read_topic

SET = "skeleton-v1"
HISTORY, LIVE = 60, 5
DEADLINE_S = 60.0


class Injected(RuntimeError):
    """The failure injected into one step of the release."""


class Step:
    """Arms one step of the release: when it is reached for the new key's candles, it raises
    (``raise``) or never returns (``kill``: the stop cancels it there)."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.armed = True
        self.reached = asyncio.Event()

    async def hit(self) -> None:
        self.armed = False
        self.reached.set()
        if self.how == "raise":
            raise Injected("injected into the warm-up release")
        await asyncio.Event().wait()  # until cancelled


def inject(monkeypatch, step_name: str, step: Step, live_times: set[int]) -> None:
    if step_name == "apply":  # after the engine took the candles (synchronous: no kill)
        real = StreamingEngine.update_slots

        def update_slots(self, rows, open_time, *cols):
            result = real(self, rows, open_time, *cols)
            if step.armed and live_times & set(np.asarray(open_time).tolist()):
                step.armed = False
                step.reached.set()
                raise Injected("injected after the engine applied the held candles")
            return result

        monkeypatch.setattr(StreamingEngine, "update_slots", update_slots)
    elif step_name == "publish":
        real_publish = OncePerCandle.publish_many

        async def publish_many(self, events, *more):
            if step.armed and self.topic == topics.FEATURES and any(e.open_time in live_times for e in events):
                await step.hit()
            return await real_publish(self, events, *more)

        monkeypatch.setattr(OncePerCandle, "publish_many", publish_many)
    else:
        real_release = checkpoint.release_waiting

        async def release_waiting(client, keys, *partition):
            if step.armed and keys:
                await step.hit()
            return await real_release(client, keys, *partition)

        monkeypatch.setattr(checkpoint, "release_waiting", release_waiting)


async def restored(runtime) -> None:
    """The runtime owns klines.v1 and has restored its state (its replay is over)."""
    deadline = asyncio.get_running_loop().time() + DEADLINE_S
    while not (runtime.bus.owns_all() and runtime.health.status()[1].get("state_restored")):
        assert asyncio.get_running_loop().time() < deadline, "not restored in time"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("step_name, how", [
    ("apply", "raise"),
    ("publish", "raise"), ("publish", "kill"),
    ("release_waiting", "raise"), ("release_waiting", "kill"),
])
async def test_a_failure_at_any_step_of_the_release_publishes_every_held_candle_once(
    redis_url, tmp_path, monkeypatch, step_name, how
):
    base = [replace(k, symbol="NEWUSDT") for k in read_kline_csv(BTC_15M, "BTCUSDT", "15m")[: HISTORY + LIVE]]
    ParquetArchive(str(tmp_path / "archive")).write(base[:HISTORY])
    live = base[HISTORY:]
    step = Step(how)
    with monkeypatch.context() as m:
        inject(m, step_name, step, {k.open_time for k in live})
        # Waiting before the start: one batch holds them all, so no later batch flushes what a
        # failed publish left behind and hides the loss.
        await add_events(redis_url, [KlineEvent.from_kline(k) for k in live])
        runtime = build_runtime("features", redis_url, tmp_path, feature_set=SET)
        await runtime.start(http=False)
        try:
            await asyncio.wait_for(step.reached.wait(), DEADLINE_S)
        finally:
            await runtime.stop()  # the final checkpoint is written here

    runtime = build_runtime("features", redis_url, tmp_path, feature_set=SET)
    await runtime.start(http=False)
    try:
        await restored(runtime)
        got = await read_topic(redis_url, topics.FEATURES)
    finally:
        await runtime.stop()
    assert [e["open_time"] for e in got] == [k.open_time for k in live]
    cols = [np.array([getattr(k, f) for k in base]) for f in ("open", "high", "low", "close", "volume")]
    ref = compute_batch(*cols, names=["sma_20"])["sma_20"]
    assert all(e["warm"] for e in got)  # warmed from the archive both times
    assert [e["values"]["sma_20"] for e in got] == pytest.approx(list(ref[HISTORY:]), rel=1e-12)
