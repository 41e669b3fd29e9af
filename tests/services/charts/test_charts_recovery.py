"""The charts service recovers: a dead render worker, a failing retention sweep, a restart."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time

import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from libs.common import topics
from libs.common.contracts import ChartRequest, KlineEvent
from libs.common.klines import read_kline_csv
from services.charts.settings import ChartsSettings
from services.charts import app as charts_app
from services.charts.app import create
from services.charts.artifacts import ArtifactStore

from tests.streams import add_events, read_topic, wait_for_events

from tests.libs.charting.conftest import DATA


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(f"klinebus_charts_{name}", labels) or 0.0


def _settings(tmp_path, **kw) -> ChartsSettings:
    base = dict(data_dir=tmp_path, cadence_s=3600, window=60, width_px=320, height_px=240,
                render_workers=0, artifact_url=str(tmp_path / "charts"))
    return ChartsSettings(**(base | kw))


async def _until(cond, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(0.05)
    return cond()


async def test_dead_render_worker_is_replaced(redis_url, tmp_path):
    klines = read_kline_csv(DATA, "BTCUSDT", "1m")[:70]
    runtime = create(_settings(tmp_path, render_workers=1), redis_url)
    restarts = _metric("pool_restarts_total")
    await runtime.start(http=False)
    try:
        await add_events(redis_url, [KlineEvent.from_kline(k, "replay") for k in klines])
        await wait_for_events(redis_url, topics.CHARTS, 1, settle=0)
        workers = multiprocessing.active_children()  # the render pool's spawned worker
        assert workers, "the render pool has no worker process"
        for proc in workers:
            os.kill(proc.pid, signal.SIGKILL)  # as the OOM killer does
        assert await _until(lambda: all(not p.is_alive() for p in workers))
        before = len(await read_topic(redis_url, topics.CHARTS))
        await add_events(redis_url, [ChartRequest(symbol="BTCUSDT", interval="1m", window=30, requested_by="test")])
        charts = await wait_for_events(redis_url, topics.CHARTS, before + 1, timeout=60, settle=0, strict=False)
    finally:
        await runtime.stop()
    assert len(charts) == before + 1 and charts[-1]["window"] == 30
    assert charts[-1]["open_time"] == klines[-1].open_time
    assert _metric("pool_restarts_total") == restarts + 1


class FlakyStore(ArtifactStore):
    """An object store whose first retention sweep fails (a transient network error)."""

    sweeps = 0

    def expire(self, retention_s: float, now_ms: int) -> int:
        type(self).sweeps += 1
        if type(self).sweeps == 1:
            raise OSError("connection reset by object store")
        return super().expire(retention_s, now_ms)


async def test_failing_retention_sweep_keeps_sweeping(redis_url, tmp_path, monkeypatch):
    monkeypatch.setattr(charts_app, "ArtifactStore", FlakyStore)
    monkeypatch.setattr(FlakyStore, "sweeps", 0)
    errors = _metric("expire_errors_total")
    runtime = create(_settings(tmp_path, expire_every_s=0.05), redis_url)
    await runtime.start(http=False)
    try:
        swept_again = await _until(lambda: FlakyStore.sweeps >= 3, timeout=20)
        ready, checks = runtime.health.status()
    finally:
        await runtime.stop()
    assert swept_again, f"only {FlakyStore.sweeps} sweep(s): the loop died on the failure"
    assert _metric("expire_errors_total") == errors + 1
    assert ready, checks


async def test_restarted_service_charts_from_the_stream_history(redis_url, tmp_path):
    klines = read_kline_csv(DATA, "BTCUSDT", "1m")[:101]
    # 100 candles on klines.v1 that a previous run of the service already consumed (its group is past them)
    await add_events(redis_url, [KlineEvent.from_kline(k, "replay") for k in klines[:100]])
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.xgroup_create(topics.stream_key(topics.KLINES), "charts", id="$", mkstream=True)
    finally:
        await client.aclose()
    runtime = create(_settings(tmp_path), redis_url)
    await runtime.start(http=False)
    try:
        await add_events(redis_url, [KlineEvent.from_kline(klines[100], "replay")])
        charts = await wait_for_events(redis_url, topics.CHARTS, 1, timeout=30, settle=0, strict=False)
    finally:
        await runtime.stop()
    assert charts, "no chart: the restarted service held only the one new candle"
    c = charts[0]
    assert c["window"] == 60
    assert c["open_time"] == klines[100].open_time and c["first_open_time"] == klines[41].open_time
