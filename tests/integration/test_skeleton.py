"""The walking skeleton end to end on real parts: a Binance-speaking simulator on loopback
replaying real candles -> ingest -> klines.v1 -> features -> features.v1 -> inference ->
predictions.v1, all through a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis

from libs.common import topics
from libs.common.bus import DATA_FIELD
from libs.common.klines import read_kline_csv
from libs.common.pipeline import start_runtimes, stop_runtimes
from services.ingest.simulator import ExchangeSimulator

SHIPPED = Path(__file__).resolve().parents[2] / "data" / "klines"
SYMBOLS = ("BTCUSDT", "ETHUSDT")
CANDLES = 60


def shipped(n: int = CANDLES) -> dict:
    out = {}
    for symbol in SYMBOLS:
        (path,) = SHIPPED.glob(f"{symbol}-1m-*.csv.gz")
        out[(symbol, "1m")] = read_kline_csv(path)[:n]
    return out


async def events(url: str, topic: str) -> list[dict]:
    client = aioredis.Redis.from_url(url)
    try:
        return [orjson.loads(f[DATA_FIELD.encode()]) for _, f in await client.xrange(topics.stream_key(topic))]
    finally:
        await client.aclose()


async def wait_count(url: str, topic: str, expected: int, timeout: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout
    got: list[dict] = []
    while time.monotonic() < deadline:
        got = await events(url, topic)
        if len(got) >= expected:
            await asyncio.sleep(0.5)  # a duplicate, if any, would land now
            return await events(url, topic)
        await asyncio.sleep(0.1)
    raise AssertionError(f"{topic}: {len(got)} of {expected} events after {timeout}s")


@contextlib.asynccontextmanager
async def replaying(candles, **kw):
    """A simulator whose replay waits for ingest to connect."""
    sim = ExchangeSimulator(candles, **kw)
    await sim.start(replay=False)
    try:
        yield sim
    finally:
        await sim.stop()


def per_stream(evts: list[dict]) -> dict[tuple[str, str], list[int]]:
    out: dict[tuple[str, str], list[int]] = {}
    for e in evts:
        out.setdefault((e["symbol"], e["interval"]), []).append(e["open_time"])
    return out


def ingest_overrides(sim: ExchangeSimulator) -> dict:
    return {
        "ingest": dict(
            binance_ws_url=sim.ws_url, binance_rest_url=sim.rest_url, symbols=list(SYMBOLS), intervals=["1m"],
            reconnect_initial_s=0.05, reconnect_max_s=0.5,
        ),
        "features": dict(feature_set="chart-analysis-v1"),
    }


SERVICES = ("inference", "features", "ingest")


async def test_every_replayed_candle_yields_one_features_event_and_one_prediction_in_order(redis_url, tmp_path):
    candles = shipped()
    expected = {key: [k.open_time for k in ks] for key, ks in candles.items()}
    total = sum(len(v) for v in expected.values())
    async with replaying(candles, speed=3000) as sim:
        runtimes = await start_runtimes(SERVICES, redis_url, tmp_path, ingest_overrides(sim), http=False)
        try:
            await sim.begin_when_connected()
            klines = await wait_count(redis_url, topics.KLINES, total)
            features = await wait_count(redis_url, topics.FEATURES, total)
            predictions = await wait_count(redis_url, topics.PREDICTIONS, total)
        finally:
            await stop_runtimes(runtimes)

    assert per_stream(klines) == expected
    assert per_stream(features) == expected
    assert per_stream(predictions) == expected
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
    assert await events(redis_url, topics.DEAD_LETTERS) == []


async def test_a_restarted_features_service_neither_drops_nor_doubles(redis_url, tmp_path):
    """Stop features mid-replay and start it again: its state and its output carry on as if it never stopped."""
    candles = shipped()
    total = sum(len(v) for v in candles.values())
    async with replaying(candles, speed=1500) as sim:
        runtimes = await start_runtimes(SERVICES, redis_url, tmp_path, ingest_overrides(sim), http=False)
        features = next(r for r in runtimes if r.name == "features")
        try:
            await sim.begin_when_connected()
            await wait_count(redis_url, topics.FEATURES, total // 3)
            await features.stop()
            await asyncio.sleep(0.5)  # candles keep arriving on klines.v1 meanwhile
            restarted = (await start_runtimes(["features"], redis_url, tmp_path, ingest_overrides(sim), http=False))[0]
            runtimes[runtimes.index(features)] = restarted
            got = await wait_count(redis_url, topics.FEATURES, total)
            await wait_count(redis_url, topics.PREDICTIONS, total)
        finally:
            await stop_runtimes(runtimes)
    expected = {key: [k.open_time for k in ks] for key, ks in candles.items()}
    assert per_stream(got) == expected

    # Values after the restart equal an uninterrupted batch computation over the same candles.
    import numpy as np

    from services.features.batch import compute_batch

    for (symbol, _), ks in candles.items():
        cols = [np.array([getattr(k, f) for k in ks]) for f in ("open", "high", "low", "close", "volume")]
        batch = compute_batch(*cols, names=["macd", "rsi_14"])
        streamed = [f for f in got if f["symbol"] == symbol and f["warm"]]
        assert streamed, "no warm features"
        for f in streamed:
            i = next(j for j, k in enumerate(ks) if k.open_time == f["open_time"])
            assert f["values"]["macd"] == pytest.approx(batch["macd"][i], abs=1e-9)
            assert f["values"]["rsi_14"] == pytest.approx(batch["rsi_14"][i], abs=1e-9)
