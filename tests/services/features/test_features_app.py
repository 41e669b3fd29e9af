"""The features service on a real Redis: warm start from the archive, one event per candle,
re-deliveries, impossible candles, and a stream-only warm-up."""

from __future__ import annotations


import numpy as np
import orjson
import pytest
import redis.asyncio as aioredis

from libs.common import topics
from libs.common.contracts import KlineEvent
from libs.common.klines import read_kline_csv
from klinebus.pipeline import build_runtime
from libs.indicators.batch import compute_batch
from libs.common.archive import ParquetArchive
from tests.streams import add_events, read_topic, wait_for_events

from tests.candles import BTC_15M

NAMES = ("macd", "rsi_14", "ema_200", "bb_pctb", "adx_14", "obv")
# batch_reference computes these plus VPT


def candles(n: int):
    return read_kline_csv(BTC_15M, "BTCUSDT", "15m")[:n]


async def publish(url: str, klines, source="ws") -> None:
    await add_events(url, [KlineEvent.from_kline(k, source) for k in klines])


def batch_reference(ks) -> dict[str, np.ndarray]:
    cols = [np.array([getattr(k, f) for k in ks]) for f in ("open", "high", "low", "close", "volume")]
    return compute_batch(*cols, names=list(NAMES) + ["vpt"])


async def test_warm_start_from_the_archive_equals_batch_over_archive_plus_live(redis_url, tmp_path):
    """With the default settings the whole archive is fed, so even cumulative indicators (OBV, VPT)
    and EMA-200's seed equal the batch computation a model was trained on."""
    ks = candles(1400)
    history, live = ks[:1300], ks[1300:]
    ParquetArchive(str(tmp_path / "archive")).write(history)
    runtime = build_runtime("features", redis_url, tmp_path, feature_set="all-v1")
    await runtime.start(http=False)
    try:
        await publish(redis_url, live)
        got = await wait_for_events(redis_url, topics.FEATURES, len(live))
    finally:
        await runtime.stop()
    assert [e["open_time"] for e in got] == [k.open_time for k in live]
    assert all(e["warm"] for e in got)
    ref = batch_reference(ks)
    for i, e in enumerate(got, start=1300):
        for name in NAMES + ("vpt",):
            assert e["values"][name] == pytest.approx(ref[name][i], abs=1e-9, rel=1e-12), (name, i)


async def test_unusable_history_is_skipped_and_the_key_warms_up_live(redis_url, tmp_path):
    import pandas as pd

    ks = candles(60)
    ParquetArchive(str(tmp_path / "archive")).write(ks[:30])
    # Corrupt the archived file behind the archive's back: a NaN close.
    (path,) = (tmp_path / "archive" / "BTCUSDT" / "15m").glob("*.parquet")
    frame = pd.read_parquet(path)
    frame.loc[5, "close"] = float("nan")
    frame.to_parquet(path)
    runtime = build_runtime("features", redis_url, tmp_path, feature_set="skeleton-v1")
    await runtime.start(http=False)
    try:
        await publish(redis_url, ks[30:])
        got = await wait_for_events(redis_url, topics.FEATURES, 30)
        letters = await read_topic(redis_url, topics.DEAD_LETTERS)
    finally:
        await runtime.stop()
    assert letters == []  # live candles are fine; only the history was bad
    assert [e["warm"] for e in got] == [False] * 19 + [True] * 11  # warmed up live
    assert runtime.metrics.counter("warmup_failures_total", "", ["interval"]).labels("15m")._value.get() == 1


async def test_redelivered_and_impossible_candles(redis_url, tmp_path):
    ks = candles(50)
    runtime = build_runtime("features", redis_url, tmp_path, feature_set="skeleton-v1", warmup_source="none")
    await runtime.start(http=False)
    try:
        await publish(redis_url, ks[:30])
        await wait_for_events(redis_url, topics.FEATURES, 30)
        await publish(redis_url, ks[10:20], source="rest")  # a replay: nothing new may appear
        # An impossible candle from a foreign producer (the contract would not let us build one).
        impossible = {**KlineEvent.from_kline(ks[30]).model_dump(), "high": ks[30].low * 0.5}
        client = aioredis.Redis.from_url(redis_url)
        await client.xadd(topics.stream_key(topics.KLINES), {"__data__": orjson.dumps(impossible)})
        await client.aclose()
        await publish(redis_url, ks[31:50])
        got = await wait_for_events(redis_url, topics.FEATURES, 49)
        letters = await read_topic(redis_url, topics.DEAD_LETTERS)
    finally:
        await runtime.stop()
    assert [e["open_time"] for e in got] == [k.open_time for k in ks[:30] + ks[31:50]]
    assert len(letters) == 1 and "< low" in letters[0]["reason"], letters
    assert letters[0]["service"] == "features" and letters[0]["source"] == topics.KLINES
    assert runtime.metrics.duplicates.labels(topics.KLINES)._value.get() == 10
    # warm-up is flagged, never NaN: skeleton-v1's longest warm-up is SMA-20's 20 candles
    assert [e["warm"] for e in got[:21]] == [False] * 19 + [True] * 2
    assert got[0]["values"] == {}


async def test_stream_warm_up_reads_the_keys_history_from_klines(redis_url, tmp_path):
    ks = candles(260)
    await publish(redis_url, ks[:250])
    # A consumer group that starts now sees only what comes next (as after MAXLEN trimmed the past).
    client = aioredis.Redis.from_url(redis_url)
    await client.xgroup_create(topics.stream_key(topics.KLINES), "features", id="$", mkstream=True)
    await client.aclose()
    runtime = build_runtime("features", redis_url, tmp_path, feature_set="all-v1", warmup_source="stream")
    await runtime.start(http=False)
    try:
        await publish(redis_url, ks[250:])
        got = await wait_for_events(redis_url, topics.FEATURES, 10)
    finally:
        await runtime.stop()
    assert [e["open_time"] for e in got] == [k.open_time for k in ks[250:]]
    assert all(e["warm"] for e in got)
    ref = batch_reference(ks)
    assert got[-1]["values"]["ema_200"] == pytest.approx(ref["ema_200"][-1], abs=1e-9)


async def test_stopping_during_a_backlog_while_candles_keep_coming_loses_nothing(redis_url, tmp_path):
    """The reviewer's case: stop features while it works through a backlog, let live candles
    arrive, start it again: every candle has exactly one event, in order, equal to batch."""
    ks = candles(700)
    await publish(redis_url, ks[:680])
    settings = dict(feature_set="chart-analysis-v1", warmup_source="none", checkpoint_every_s=0.2)
    runtime = build_runtime("features", redis_url, tmp_path, **settings)
    await runtime.start(http=False)
    try:
        await wait_for_events(redis_url, topics.FEATURES, 150, settle=0)
    finally:
        await runtime.stop()
    await publish(redis_url, ks[680:])  # live candles while it is down
    runtime = build_runtime("features", redis_url, tmp_path, **settings)
    await runtime.start(http=False)
    try:
        got = await wait_for_events(redis_url, topics.FEATURES, 700)
    finally:
        await runtime.stop()
    assert [e["open_time"] for e in got] == [k.open_time for k in ks]
    cols = [np.array([getattr(k, f) for k in ks]) for f in ("open", "high", "low", "close", "volume")]
    ref = compute_batch(*cols, names=["macd", "rsi_14"])
    for i, e in enumerate(got):
        if e["warm"]:
            assert e["values"]["macd"] == pytest.approx(ref["macd"][i], abs=1e-9)
            assert e["values"]["rsi_14"] == pytest.approx(ref["rsi_14"][i], abs=1e-9)


async def test_a_failed_publish_is_retried_and_the_event_still_appears_once(redis_url, tmp_path, monkeypatch):
    from redis.exceptions import ConnectionError as RedisConnectionError

    from libs.common import bus as bus_module

    real_publish = bus_module.OncePerCandle.publish_many
    failures = {"left": 2}

    async def flaky_publish(self, events, *more):
        hit = any(e.open_time == candles(30)[12].open_time for e in events)
        if self.topic == topics.FEATURES and hit and failures["left"]:
            failures["left"] -= 1
            raise RedisConnectionError("connection reset while publishing")
        return await real_publish(self, events, *more)

    monkeypatch.setattr(bus_module.OncePerCandle, "publish_many", flaky_publish)
    ks = candles(30)
    runtime = build_runtime("features", redis_url, tmp_path, feature_set="skeleton-v1", warmup_source="none")
    await runtime.start(http=False)
    try:
        await publish(redis_url, ks)
        got = await wait_for_events(redis_url, topics.FEATURES, 30)
    finally:
        await runtime.stop()
    assert failures["left"] == 0
    assert [e["open_time"] for e in got] == [k.open_time for k in ks]
