"""Streaming engine: equals batch for every feature, idempotent, gap-aware, checkpointable."""

from __future__ import annotations

import numpy as np
import pytest

from libs.indicators.batch import compute_batch
from libs.indicators.catalog import FEATURE_NAMES
from libs.indicators.feature_sets import get_feature_set
from libs.indicators.streaming import InvalidCandles, SnapshotMismatch, StreamingEngine

HOUR_MS = 3_600_000


def stream_all(engine, key, candles, start=0, stop=None):
    stop = len(candles.close) if stop is None else stop
    return [
        engine.update(
            key, int(candles.open_time[i]), candles.open[i], candles.high[i], candles.low[i],
            candles.close[i], candles.volume[i],
        )
        for i in range(start, stop)
    ]


def assert_equals_batch(results, batch, names, offset=0, tol=1e-9):
    checked = 0
    for i, r in enumerate(results, start=offset):
        if r.values is None:
            continue
        assert list(r.values) == list(names)
        for name, value in r.values.items():
            assert abs(value - batch[name][i]) <= tol, f"{name} at candle {i}: {value} vs {batch[name][i]}"
        checked += 1
    return checked


def test_streaming_equals_batch_for_every_feature(real):
    engine = StreamingEngine("all-v1")
    key = (real.name.split("-")[0], real.name.split("-")[1])
    results = stream_all(engine, key, real)
    batch = compute_batch(*real.ohlcv)
    warm = engine.warmup_candles
    assert all(r.values is None and r.status == "warming" for r in results[: warm - 1])
    assert all(r.status == "ok" for r in results[warm - 1 :])
    assert assert_equals_batch(results, batch, FEATURE_NAMES) == len(results) - warm + 1
    assert all(np.isfinite(list(r.values.values())).all() for r in results[warm - 1 :])


def test_many_keys_in_one_call_equal_each_keys_batch(btc, eth_gaps):
    engine = StreamingEngine("lstm-35-v1")
    keys = [("BTCUSDT", "15m"), ("ETHUSDT", "1h")]
    n = 600
    per_key = {keys[0]: btc, keys[1]: eth_gaps}
    batches = {k: compute_batch(*c.ohlcv) for k, c in per_key.items()}
    for i in range(n):
        # both keys each step, plus a re-delivered copy of BTC's previous candle
        rows = [(keys[0], i), (keys[1], i)] + ([(keys[0], i - 1)] if i else [])
        b = engine.update_many(
            [k for k, _ in rows],
            [per_key[k].open_time[j] for k, j in rows],
            *([getattr(per_key[k], f)[j] for k, j in rows] for f in ("open", "high", "low", "close", "volume")),
        )
        for (key, j), upd in zip(rows, b):
            if j < i:
                assert upd.status == "duplicate" and upd.values is None
            elif upd.values is not None:
                for name, value in upd.values.items():
                    assert abs(value - batches[key][name][j]) <= 1e-9, (key, name, j)
    assert engine.candles_seen(keys[0]) == engine.candles_seen(keys[1]) == n


def test_redelivery_is_ignored_and_changes_nothing(btc):
    engine = StreamingEngine("skeleton-v1")
    key = ("BTCUSDT", "15m")
    stream_all(engine, key, btc, 0, 100)
    before = engine.snapshot()
    again = stream_all(engine, key, btc, 50, 100)
    assert {r.status for r in again} == {"duplicate"}
    assert engine.snapshot() == before
    nxt = stream_all(engine, key, btc, 100, 101)[0]
    assert nxt.status == "ok"
    assert nxt.values["close"] == btc.close[100]


def test_gap_is_reported_and_computed_across_like_batch(eth_gaps):
    engine = StreamingEngine("all-v1")
    results = stream_all(engine, ("ETHUSDT", "1h"), eth_gaps)
    steps = np.diff(eth_gaps.open_time)
    expected = {i + 1: int(s - HOUR_MS) for i, s in enumerate(steps) if s > HOUR_MS}
    assert expected, "the slice is meant to hold real outage gaps"
    assert {i: r.gap_ms for i, r in enumerate(results) if r.gap_ms} == expected
    batch = compute_batch(*eth_gaps.ohlcv, open_time=eth_gaps.open_time, interval_ms=HOUR_MS, allow_gaps=True)
    assert assert_equals_batch(results, batch, FEATURE_NAMES) > 2000


def test_gap_policy_reset_restarts_warm_up(eth_gaps):
    engine = StreamingEngine("skeleton-v1", gap_policy="reset")
    results = stream_all(engine, ("ETHUSDT", "1h"), eth_gaps)
    first_gap = next(i for i, r in enumerate(results) if r.gap_ms)
    warm = engine.warmup_candles
    assert all(r.values is None for r in results[first_gap : first_gap + warm - 1])
    # after the reset the key equals a batch run that starts at the gap
    sub = compute_batch(*(x[first_gap:] for x in eth_gaps.ohlcv), names=engine.names)
    r = results[first_gap + warm - 1]
    assert r.values is not None
    for name, value in r.values.items():
        assert abs(value - sub[name][warm - 1]) <= 1e-9


def test_snapshot_restore_continues_identically(btc):
    key = ("BTCUSDT", "15m")
    a = StreamingEngine("bilstm-13-v1")
    stream_all(a, key, btc, 0, 1500)
    b = StreamingEngine("bilstm-13-v1")
    assert b.restore(a.snapshot()) == 1
    assert b.last_open_time(key) == int(btc.open_time[1499])
    ra = stream_all(a, key, btc, 1500, 1600)
    rb = stream_all(b, key, btc, 1500, 1600)
    assert [r.values for r in ra] == [r.values for r in rb]


def test_restore_refuses_other_feature_set_or_garbage(btc):
    a = StreamingEngine("bilstm-13-v1")
    stream_all(a, ("BTCUSDT", "15m"), btc, 0, 10)
    with pytest.raises(SnapshotMismatch, match="feature_set"):
        StreamingEngine("all-v1").restore(a.snapshot())
    with pytest.raises(SnapshotMismatch, match="not a features snapshot"):
        StreamingEngine("all-v1").restore(b"not a snapshot")


def test_warmup_from_history_then_live_equals_batch(btc):
    engine = StreamingEngine("all-v1")
    key = ("BTCUSDT", "15m")
    applied = engine.warmup(key, btc.open_time[:1000], *(x[:1000] for x in btc.ohlcv))
    assert applied == 1000 and engine.is_warm(key)
    # overlapping history is skipped, not applied twice
    assert engine.warmup(key, btc.open_time[500:1200], *(x[500:1200] for x in btc.ohlcv)) == 200
    results = stream_all(engine, key, btc, 1200, 1300)
    assert assert_equals_batch(results, compute_batch(*btc.ohlcv), FEATURE_NAMES, offset=1200) == 100


def test_invalid_candle_raises_and_leaves_state_alone(btc):
    engine = StreamingEngine("skeleton-v1")
    key = ("BTCUSDT", "15m")
    stream_all(engine, key, btc, 0, 30)
    before = engine.snapshot()
    t = int(btc.open_time[30])
    for bad, match in (
        ((100.0, 101.0, 99.0, float("nan"), 1.0), "NaN"),
        ((100.0, 101.0, 99.0, 0.0, 1.0), "zero or negative"),
        ((100.0, 98.0, 99.0, 100.0, 1.0), "high is below low"),
        ((100.0, 101.0, 99.0, 102.0, 1.0), "outside"),
        ((100.0, 101.0, 99.0, 100.0, -1.0), "volume is negative"),
    ):
        with pytest.raises(InvalidCandles, match=match):
            engine.update(key, t, *bad)
    assert engine.snapshot() == before
    batch = engine.update_many([key, key], [t, t], [1.0, btc.open[30]], [2.0, btc.high[30]],
                               [3.0, btc.low[30]], [1.5, btc.close[30]], [1.0, btc.volume[30]])
    assert [u.status for u in batch] == ["invalid", "ok"]
    assert "high is below low" in batch.reasons[0]


def test_unknown_interval_is_refused():
    with pytest.raises(ValueError, match="unknown interval"):
        StreamingEngine().update(("BTCUSDT", "7m"), 0, 1.0, 1.0, 1.0, 1.0, 1.0)


def test_feature_sets_match_their_seeds():
    assert len(get_feature_set("bilstm-13-v1").features) == 13
    lstm = get_feature_set("lstm-35-v1").features
    assert len([f for f in lstm if f not in ("open", "high", "low", "close", "volume")]) >= 35
    assert set(get_feature_set("chart-analysis").features) >= {"sma_20", "ema_20", "rsi_14", "macd",
                                                                "cdl_hammer", "cdl_engulfing"}
    assert get_feature_set("all-v1").features == FEATURE_NAMES
