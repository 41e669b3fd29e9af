"""The fast paths (two threads, only the needed indicator groups) change no number, not one bit."""

from __future__ import annotations

import numpy as np
import pytest

from libs.indicators import batch, kernels, streaming
from libs.indicators.batch import compute_batch, compute_matrix
from libs.indicators.catalog import FEATURE_NAMES
from libs.indicators.streaming import StreamingEngine


def single_thread_matrix(candles) -> np.ndarray:
    out = kernels.new_output(len(candles.close))
    kernels.run_series(kernels.new_state(1), 0, *candles.ohlcv, out, True, kernels.G_ALL)
    return out


def test_two_lane_batch_is_bit_identical_to_one_thread(real, monkeypatch):
    monkeypatch.setattr(batch, "PARALLEL_MIN_CANDLES", 0)
    assert batch._lanes_pool() is not None, "this check needs two CPUs"
    got = compute_matrix(*real.ohlcv)
    np.testing.assert_array_equal(got, single_thread_matrix(real))


def test_two_lane_history_leaves_the_same_state(btc, monkeypatch):
    monkeypatch.setattr(batch, "PARALLEL_MIN_CANDLES", 0)
    lanes, one = kernels.new_state(1), kernels.new_state(1)
    batch.run_history(lanes, 0, btc.ohlcv, kernels.new_output(1), False)
    kernels.run_series(one, 0, *btc.ohlcv, kernels.new_output(1), False, kernels.G_ALL)
    np.testing.assert_array_equal(lanes, one)


def test_asking_for_some_features_gives_the_same_values(btc):
    full = compute_matrix(*btc.ohlcv)
    for names in (["rsi_14"], ["bb_pctb", "close"], ["cdl_doji", "kc_upper", "obv", "macd"]):
        got = compute_batch(*btc.ohlcv, names=names)
        for name in names:
            np.testing.assert_array_equal(got[name], full[:, FEATURE_NAMES.index(name)], err_msg=name)


def test_threaded_many_key_updates_equal_batch(btc, eth_gaps, monkeypatch):
    """Rows split over two threads by key; a key's repeated rows in one call still apply in order."""
    monkeypatch.setattr(streaming, "PARALLEL_MIN_ROWS", 0)
    monkeypatch.setattr(streaming, "PARALLEL_ROWS", True)
    engine = StreamingEngine("all-v1")
    per_key = {("BTCUSDT", "15m"): btc, ("ETHUSDT", "1h"): eth_gaps, ("BTCUSDT", "1h"): btc}
    keys = list(per_key)
    full = {k: compute_matrix(*c.ohlcv) for k, c in per_key.items()}
    n, step = 900, 3
    checked = 0
    for start in range(0, n, step):
        # each call: `step` consecutive candles of every key, interleaved, plus a re-delivery
        rows = [(k, i) for i in range(start, start + step) for k in keys] + [(keys[0], start)]
        b = engine.update_many(
            [k for k, _ in rows],
            [per_key[k].open_time[i] for k, i in rows],
            *([getattr(per_key[k], f)[i] for k, i in rows] for f in ("open", "high", "low", "close", "volume")),
        )
        assert b.status[-1] == kernels.ST_DUPLICATE
        for r, (k, i) in enumerate(rows[:-1]):
            if b.status[r] == kernels.ST_OK:
                np.testing.assert_array_equal(b.values[r], full[k][i])
                checked += 1
    assert checked == len(keys) * (n - engine.warmup_candles + 1)


@pytest.mark.parametrize("threshold", [0, 1 << 62])  # two lanes (one of them checks), one thread
def test_chunked_validation_names_the_first_impossible_candle(btc, monkeypatch, threshold):
    """Candles are validated chunk by chunk as the groups go; the error is still the first bad candle's."""
    from libs.indicators import fused
    from libs.indicators.validation import InvalidCandles

    monkeypatch.setattr(batch, "PARALLEL_MIN_CANDLES", threshold)
    n = len(btc.close)
    c = fused.CHUNK
    for bad in ([n - 3], [n // 2], [n // 2 - 1], [5, n - 3], [n // 2 + 1, n - 1], [fused.WARM - 1, n - 1],
                [fused.WARM], [fused.WARM + c - 1, fused.WARM + c], [fused.WARM + c]):
        high = btc.high.copy()
        high[bad] = -1.0
        with pytest.raises(InvalidCandles) as err:
            compute_batch(btc.open, high, btc.low, btc.close, btc.volume, names=["rsi_14"])
        assert err.value.index == bad[0]


def test_lanes_split_the_asked_groups_and_balance_them():
    want = np.ones(kernels.N_FEATURES, dtype=np.bool_)
    for groups in (kernels.G_ALL, kernels.G_BANDS | kernels.G_PATTERNS, kernels.G_RANGES):
        a, b = batch.split_lanes(groups, want)
        assert a | b == groups and not a & b and a
    a, b = batch.split_lanes(kernels.G_ALL, want)
    cost = {g: sum(c for f, c in batch.COLUMN_COST.items() if kernels.GROUP_OF_COLUMN[f] == g) + c
            for g, c in batch.GROUP_COST.items()}
    lane_a, lane_b = (sum(c for g, c in cost.items() if g & lane) for lane in (a, b))
    assert b and lane_a >= lane_b and lane_a - lane_b <= min(cost.values())


def test_lanes_into_shared_rows_keep_each_lanes_columns_together():
    """Into a (candles, features) matrix: one boundary between the lanes' columns, not eight."""
    want = np.zeros(kernels.N_FEATURES, dtype=np.bool_)
    want[[FEATURE_NAMES.index(n) for n in ("sma_10", "rsi_14", "macd", "stoch_k", "bb_upper", "atr_14", "obv",
                                           "cdl_doji")]] = True
    a, b = batch.split_lanes(kernels.G_ALL, want, shared_rows=True)
    owner = [bool(kernels.GROUP_OF_COLUMN[f] & a) for f in np.flatnonzero(want)]
    assert sum(x != y for x, y in zip(owner, owner[1:])) == 1
