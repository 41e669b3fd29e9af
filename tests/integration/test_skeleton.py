"""The walking skeleton end to end on real parts: a Binance-speaking simulator on loopback
replaying real candles -> ingest -> klines.v1 -> features -> features.v1 -> inference ->
predictions.v1, all through a real redis-server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from libs.common import topics
from libs.common.klines import read_kline_csv
from klinebus.pipeline import start_runtimes, stop_runtimes
from tests.streams import open_times_by_stream, read_topic, replaying, wait_for_events

pytestmark = pytest.mark.slow

SHIPPED = Path(__file__).resolve().parents[2] / "data" / "klines"
SYMBOLS = ("BTCUSDT", "ETHUSDT")
CANDLES = 60


def shipped(n: int = CANDLES) -> dict:
    out = {}
    for symbol in SYMBOLS:
        (path,) = SHIPPED.glob(f"{symbol}-1m-*.csv.gz")
        out[(symbol, "1m")] = read_kline_csv(path)[:n]
    return out


def ingest_overrides(sim) -> dict:
    return {
        "ingest": dict(
            binance_ws_url=sim.ws_url, binance_rest_url=sim.rest_url, symbols=list(SYMBOLS), intervals=["1m"],
            reconnect_initial_s=0.05, reconnect_max_s=0.5,
        ),
        "features": dict(feature_set="chart-analysis-v1"),
    }


SERVICES = ("inference", "features", "ingest")


async def run_skeleton(url: str, tmp_path, candles: dict, **every_service) -> tuple[list, list, list]:
    """Replay ``candles`` through ingest -> features -> inference (``every_service``: settings
    given to each service, e.g. ``partitions``); klines.v1, features.v1 and predictions.v1 once
    each holds one event per candle."""
    total = sum(len(v) for v in candles.values())
    async with replaying(candles, speed=3000) as sim:
        overrides = {name: {**every_service, **ingest_overrides(sim).get(name, {})} for name in SERVICES}
        runtimes = await start_runtimes(SERVICES, url, tmp_path, overrides, http=False)
        try:
            await sim.begin_when_connected()
            return (await wait_for_events(url, topics.KLINES, total), await wait_for_events(url, topics.FEATURES, total),
                    await wait_for_events(url, topics.PREDICTIONS, total))
        finally:
            await stop_runtimes(runtimes)


async def test_every_replayed_candle_yields_one_features_event_and_one_prediction_in_order(redis_url, tmp_path):
    candles = shipped()
    expected = {key: [k.open_time for k in ks] for key, ks in candles.items()}
    klines, features, predictions = await run_skeleton(redis_url, tmp_path, candles)

    assert open_times_by_stream(klines) == expected
    assert open_times_by_stream(features) == expected
    assert open_times_by_stream(predictions) == expected
    # The features are of the candle they claim, and warm up once (chart-analysis-v1: MACD needs 34).
    by_time = {(k.symbol, k.open_time): k for ks in candles.values() for k in ks}
    for f in features:
        assert f["close"] == by_time[(f["symbol"], f["open_time"])].close
        assert all(v == v for v in f["values"].values())  # never NaN
    warm_flags = [f["warm"] for f in features if f["symbol"] == "BTCUSDT"]
    assert warm_flags == [False] * 33 + [True] * (CANDLES - 33)
    # Persistence: the forecast for the next candle is this candle's close.
    for p in predictions:
        assert p["predicted"]["close"] == by_time[(p["symbol"], p["open_time"])].close
        assert p["target_open_time"] == p["open_time"] + 60_000
    assert await read_topic(redis_url, topics.DEAD_LETTERS) == []


async def test_a_restarted_features_service_neither_drops_nor_doubles(redis_url, tmp_path):
    """Stop features mid-replay and start it again: its state and its output carry on as if it never stopped."""
    candles = shipped()
    total = sum(len(v) for v in candles.values())
    async with replaying(candles, speed=1500) as sim:
        runtimes = await start_runtimes(SERVICES, redis_url, tmp_path, ingest_overrides(sim), http=False)
        features = next(r for r in runtimes if r.name == "features")
        try:
            await sim.begin_when_connected()
            await wait_for_events(redis_url, topics.FEATURES, total // 3)
            await features.stop()
            await asyncio.sleep(0.5)  # candles keep arriving on klines.v1 meanwhile
            restarted = (await start_runtimes(["features"], redis_url, tmp_path, ingest_overrides(sim), http=False))[0]
            runtimes[runtimes.index(features)] = restarted
            got = await wait_for_events(redis_url, topics.FEATURES, total)
            await wait_for_events(redis_url, topics.PREDICTIONS, total)
        finally:
            await stop_runtimes(runtimes)
    expected = {key: [k.open_time for k in ks] for key, ks in candles.items()}
    assert open_times_by_stream(got) == expected

    # Values after the restart equal an uninterrupted batch computation over the same candles.
    import numpy as np

    from libs.indicators.batch import compute_batch

    for (symbol, _), ks in candles.items():
        cols = [np.array([getattr(k, f) for k in ks]) for f in ("open", "high", "low", "close", "volume")]
        batch = compute_batch(*cols, names=["macd", "rsi_14"])
        streamed = [f for f in got if f["symbol"] == symbol and f["warm"]]
        assert streamed, "no warm features"
        for f in streamed:
            i = next(j for j, k in enumerate(ks) if k.open_time == f["open_time"])
            assert f["values"]["macd"] == pytest.approx(batch["macd"][i], abs=1e-9)
            assert f["values"]["rsi_14"] == pytest.approx(batch["rsi_14"][i], abs=1e-9)
