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
from services.features import app as features_app
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

    real_read = features_app.read_archive
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

    monkeypatch.setattr(features_app, "read_archive", read_archive)
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
