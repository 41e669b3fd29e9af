"""New keys warm up together, not one at a time (issue 9: features read each new key's archive
history inside the handler on its first candle, one key after another, so the first burst at
4,000 symbols took 12 s and ten more to catch up).

The archive read used for warm-up is wrapped to record how many reads are in flight at once;
each read waits (bounded) until every new key's read has started, so reads made one after
another show a peak of 1."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest

from klinebus.pipeline import build_runtime
from libs.common import topics
from libs.common.archive import ParquetArchive
from libs.common.contracts import KlineEvent
from libs.common.klines import read_kline_csv
from libs.indicators.batch import compute_batch
from services.features import history as features_history
from tests.candles import BTC_15M
from tests.streams import add_events, wait_for_events

SET = "skeleton-v1"
SYMBOLS = ("AAAUSDT", "BBBUSDT", "CCCUSDT")
HISTORY, LIVE = 60, 5
# a read waits at most this long for the other keys' reads to start
ALL_IN_FLIGHT_WAIT_S = 10.0


async def test_new_keys_read_their_history_concurrently_and_warm_up(redis_url, tmp_path, monkeypatch):
    base = read_kline_csv(BTC_15M, "BTCUSDT", "15m")[: HISTORY + LIVE]
    series = {s: [replace(k, symbol=s) for k in base] for s in SYMBOLS}
    ParquetArchive(str(tmp_path / "archive")).write([k for ks in series.values() for k in ks[:HISTORY]])

    real_read = features_history.read_archive
    lock = threading.Lock()
    in_flight = {"now": 0, "peak": 0}
    all_in = threading.Event()

    def read_archive(*args, **kwargs):
        with lock:
            in_flight["now"] += 1
            in_flight["peak"] = max(in_flight["peak"], in_flight["now"])
            if in_flight["now"] == len(SYMBOLS):
                all_in.set()
        all_in.wait(ALL_IN_FLIGHT_WAIT_S)
        try:
            return real_read(*args, **kwargs)
        finally:
            with lock:
                in_flight["now"] -= 1

    monkeypatch.setattr(features_history, "read_archive", read_archive)
    # every key's first live candle is waiting before the service starts: one burst of new keys
    await add_events(redis_url, [KlineEvent.from_kline(series[s][i], "ws") for i in range(HISTORY, HISTORY + LIVE)
                                 for s in SYMBOLS])
    runtime = build_runtime("features", redis_url, tmp_path, feature_set=SET)
    await runtime.start(http=False)
    try:
        got = await wait_for_events(redis_url, topics.FEATURES, len(SYMBOLS) * LIVE)
    finally:
        await runtime.stop()
    assert in_flight["peak"] == len(SYMBOLS)
    cols = [np.array([getattr(k, f) for k in base]) for f in ("open", "high", "low", "close", "volume")]
    ref = compute_batch(*cols, names=["sma_20"])["sma_20"]
    for s in SYMBOLS:
        mine = [e for e in got if e["symbol"] == s]
        assert [e["open_time"] for e in mine] == [k.open_time for k in series[s][HISTORY:]]
        assert all(e["warm"] for e in mine)  # warmed from the archive, not live
        assert [e["values"]["sma_20"] for e in mine] == pytest.approx(list(ref[HISTORY:]), rel=1e-12)


def _reference(base) -> list[float]:
    cols = [np.array([getattr(k, f) for k in base]) for f in ("open", "high", "low", "close", "volume")]
    return list(compute_batch(*cols, names=["sma_20"])["sma_20"])


async def test_a_slow_history_read_holds_only_its_own_key_and_survives_a_restart(redis_url, tmp_path, monkeypatch):
    """A new key whose history read hangs must not hold any other key's candles (issue 9: "a
    new symbol never stalls the others"). Its own candles wait, are acknowledged, and come out in
    order once it has warmed up, even when the service stops while they wait."""
    import asyncio

    import redis.asyncio as aioredis

    from tests.streams import read_topic

    base = read_kline_csv(BTC_15M, "BTCUSDT", "15m")[: HISTORY + LIVE]
    series = {s: [replace(k, symbol=s) for k in base] for s in ("FASTUSDT", "SLOWUSDT")}
    ParquetArchive(str(tmp_path / "archive")).write([k for ks in series.values() for k in ks[:HISTORY]])
    real_read = features_history.read_archive
    slow_may_go = threading.Event()

    def read_archive(root, symbol, *args, **kwargs):
        if symbol == "SLOWUSDT":
            slow_may_go.wait(60)
        return real_read(root, symbol, *args, **kwargs)

    monkeypatch.setattr(features_history, "read_archive", read_archive)
    ref = _reference(base)
    live = [KlineEvent.from_kline(series[s][i], "ws") for i in range(HISTORY, HISTORY + LIVE) for s in series]
    await add_events(redis_url, live)
    client = aioredis.Redis.from_url(redis_url)
    runtime = build_runtime("features", redis_url, tmp_path, feature_set=SET)
    await runtime.start(http=False)
    try:
        fast = await wait_for_events(redis_url, topics.FEATURES, LIVE)
        assert {e["symbol"] for e in fast} == {"FASTUSDT"}  # nothing of SLOW yet, and FAST not held
        assert [e["values"]["sma_20"] for e in fast] == pytest.approx(ref[HISTORY:], rel=1e-12)

        async def all_acknowledged() -> bool:
            return (await client.xpending(topics.stream_key(topics.KLINES), "features"))["pending"] == 0

        deadline = asyncio.get_running_loop().time() + 30
        while not await all_acknowledged():  # SLOW's candles too: they wait in memory, recorded in Redis
            assert asyncio.get_running_loop().time() < deadline, "entries left pending"
            await asyncio.sleep(0.05)
    finally:
        await runtime.stop()  # while SLOW's history read still hangs
    assert {e["symbol"] for e in await read_topic(redis_url, topics.FEATURES)} == {"FASTUSDT"}

    slow_may_go.set()
    runtime = build_runtime("features", redis_url, tmp_path, feature_set=SET)
    await runtime.start(http=False)
    try:
        got = await wait_for_events(redis_url, topics.FEATURES, 2 * LIVE)
    finally:
        await runtime.stop()
        await client.aclose()
    slow = [e for e in got if e["symbol"] == "SLOWUSDT"]
    assert [e["open_time"] for e in slow] == [k.open_time for k in series["SLOWUSDT"][HISTORY:]]
    assert all(e["warm"] for e in slow)  # warmed from its history before its first candle
    assert [e["values"]["sma_20"] for e in slow] == pytest.approx(ref[HISTORY:], rel=1e-12)
    assert len(got) == 2 * LIVE  # FAST's were not published again
