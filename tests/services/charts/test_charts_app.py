"""klines.v1 + chart-requests.v1 -> charts.v1 on a real Redis, with a real artifact folder."""

from __future__ import annotations

import asyncio


from libs.common import topics
from libs.common.contracts import ChartRequest, KlineEvent
from libs.common.klines import read_kline_csv
from services.charts.settings import ChartsSettings
from services.charts.app import create

from tests.streams import add_events, wait_for_events

from .conftest import DATA, pixels


async def _wait(url: str, topic: str, n: int, timeout: float = 60) -> list[dict]:
    return await wait_for_events(url, topic, n, timeout, settle=0, strict=False)


async def test_schedule_request_and_bad_requests(redis_url, tmp_path):
    klines = read_kline_csv(DATA, "BTCUSDT", "1m")[:100]
    settings = ChartsSettings(data_dir=tmp_path, cadence_s=3600, window=60, width_px=640, height_px=480,
                              render_workers=0, artifact_url=str(tmp_path / "charts"))
    runtime = create(settings, redis_url)
    await runtime.start(http=False)
    try:
        await add_events(redis_url, [KlineEvent.from_kline(k, "replay") for k in klines])
        # the schedule fires once the first full window (60 candles) is held
        charts = await _wait(redis_url, topics.CHARTS, 1)
        assert len(charts) >= 1
        first = charts[0]
        assert first["window"] == 60 and first["symbol"] == "BTCUSDT"
        assert first["open_time"] >= klines[59].open_time
        assert set(first["indicators"]) >= {"sma_20", "ema_20", "rsi_14", "macd"}
        png_path = first["uri"].removeprefix("file://")
        assert pixels(open(png_path, "rb").read()).shape == (480, 640, 3)
        await asyncio.sleep(0.5)  # let the rest of the candles land
        await add_events(redis_url, [
            ChartRequest(symbol="BTCUSDT", interval="1m", window=90, requested_by="test"),
            ChartRequest(symbol="ETHUSDT", interval="1m", requested_by="test"),  # never seen
            ChartRequest(symbol="BTCUSDT", interval="1m", window=100000, requested_by="test"),
            ChartRequest(symbol="BTCUSDT", interval="1m", preset="nope", requested_by="test"),
        ])
        dead = await _wait(redis_url, topics.DEAD_LETTERS, 3)
        charts = await _wait(redis_url, topics.CHARTS, len(charts) + 1)
    finally:
        await runtime.stop()
    requested = [c for c in charts if c["window"] == 90]
    assert len(requested) == 1 and requested[0]["open_time"] == klines[-1].open_time
    reasons = sorted(d["reason"] for d in dead)
    assert len(reasons) == 3, reasons
    assert any("ETHUSDT 1m: no candles seen yet" in r for r in reasons)
    assert any("window must be 2..2000 candles, got 100000" in r for r in reasons)
    assert any("unknown chart preset 'nope'" in r for r in reasons)
