"""klines.v1 + chart-requests.v1 -> charts.v1 on a real Redis, with a real artifact folder."""

from __future__ import annotations

import asyncio


from libs.common import topics
from libs.common.contracts import ChartRequest, KlineEvent
from libs.common.klines import read_kline_csv
from services.charts.settings import ChartsSettings
from services.charts.app import create

from tests.streams import add_events, wait_for_events

from tests.libs.charting.conftest import DATA, pixels


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


async def test_cadence_charts_each_candle_once_per_preset(redis_url, tmp_path):
    """A cadence much shorter than the interval (10 minutes on 1h candles) must not republish the
    same last candle: charts.v1 goes through the once-per-candle guard and an unchanged key renders
    nothing. Before, every tick appended another chart of the same candle."""
    from tests.streams import read_topic

    klines = read_kline_csv(DATA, "BTCUSDT", "1m")[:62]
    settings = ChartsSettings(data_dir=tmp_path, cadence_s=0.2, window=60, width_px=320, height_px=240,
                              render_workers=0, artifact_url=str(tmp_path / "charts"))
    runtime = create(settings, redis_url)
    skipped = runtime.metrics.counter("skipped_total", "", ["why"]).labels("already_charted")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 90

    async def ticks() -> int:
        """Cadence ticks on an unchanged key: refused before rendering, or (before the guard) charted again."""
        return int(skipped._value.get()) + len(await read_topic(redis_url, topics.CHARTS))

    async def three_more_ticks() -> None:
        start = await ticks()
        while await ticks() < start + 3:
            assert loop.time() < deadline, "the cadence stopped ticking"
            await asyncio.sleep(0.05)

    await runtime.start(http=False)
    try:
        await add_events(redis_url, [KlineEvent.from_kline(k, "replay") for k in klines[:60]])
        await _wait(redis_url, topics.CHARTS, 1)
        await three_more_ticks()
        await add_events(redis_url, [KlineEvent.from_kline(klines[60], "replay")])
        while not any(c["open_time"] == klines[60].open_time for c in await read_topic(redis_url, topics.CHARTS)):
            assert loop.time() < deadline, "the new candle was never charted"
            await asyncio.sleep(0.05)
        await three_more_ticks()
        charts = await read_topic(redis_url, topics.CHARTS)
    finally:
        await runtime.stop()
    keys = [(c["symbol"], c["interval"], c["open_time"], c["preset"]) for c in charts]
    assert len(keys) == len(set(keys)), keys
    assert [c["open_time"] for c in charts] == [klines[59].open_time, klines[60].open_time]
    # every chart published has its PNG, and no refused render left one behind
    pngs = sorted((tmp_path / "charts").rglob("*.png"))
    assert len(pngs) == len(charts)
