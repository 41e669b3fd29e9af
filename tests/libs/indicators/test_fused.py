"""The fused batch loops (libs/indicators/fused.py) give the unfused ``kernels.step`` numbers, bit for bit.

Tolerance: none. Every output column and the final state row must be the same doubles (NaN where
NaN) on the shipped real candles (tests/data/klines), so batch (fused) and streaming (``step``)
keep train/serve parity exactly, not approximately.
"""

from __future__ import annotations

import numpy as np
import pytest

from libs.indicators import batch, fused, kernels
from libs.indicators.batch import compute_batch, compute_frame, compute_matrix
from libs.indicators.catalog import FEATURE_INDEX, FEATURE_NAMES


def unfused(candles, groups=kernels.G_ALL):
    out = kernels.new_output(len(candles.close))
    st = kernels.new_state(1)
    kernels.run_series(st, 0, *candles.ohlcv, out, True, groups)
    return out, st[0]


def assert_columns_equal(got_by_feature, want_by_candle, columns):
    for f in columns:
        np.testing.assert_array_equal(got_by_feature[f], want_by_candle[:, f], err_msg=FEATURE_NAMES[f])


@pytest.mark.parametrize("groups", [kernels.G_ALL, kernels.G_AVERAGES, kernels.G_OSCILLATORS, kernels.G_BANDS,
                                    kernels.G_RANGES, kernels.G_FLOWS, kernels.G_PATTERNS])
def test_fused_equals_step_outputs_and_state(real, groups):
    want_out, want_state = unfused(real, groups)
    got = np.full((kernels.N_FEATURES, len(real.close)), -7.0)
    st = kernels.new_state(1)[0]
    fused.run_series(st, *real.ohlcv, got, groups)
    assert_columns_equal(got, want_out, np.flatnonzero(kernels.GROUP_OF_COLUMN & groups))
    np.testing.assert_array_equal(st, want_state)


@pytest.mark.parametrize("cut", [0, 1, 100, 255, 256, 257, 1000])
def test_fused_resumes_a_state_split_anywhere(btc, cut):
    """History fed in two calls (the second starting before, at or after WARM) = one call."""
    want_out, want_state = unfused(btc)
    n = len(btc.close)
    got = np.empty((kernels.N_FEATURES, n))
    st = kernels.new_state(1)[0]
    fused.run_series(st, *(a[:cut] for a in btc.ohlcv), got[:, :cut], kernels.G_ALL)
    fused.run_series(st, *(a[cut:] for a in btc.ohlcv), got[:, cut:], kernels.G_ALL)
    assert_columns_equal(got, want_out, range(kernels.N_FEATURES))
    np.testing.assert_array_equal(st, want_state)


def test_batch_api_equals_unfused_in_both_layouts(real, monkeypatch):
    monkeypatch.setattr(batch, "PARALLEL_MIN_CANDLES", 0)  # the two-thread split on a short input
    want_out, _ = unfused(real)
    np.testing.assert_array_equal(compute_matrix(*real.ohlcv), want_out)
    got = compute_batch(*real.ohlcv)  # (features, candles) layout: contiguous rows
    for name, x in got.items():
        assert x.flags.c_contiguous
        np.testing.assert_array_equal(x, want_out[:, FEATURE_INDEX[name]], err_msg=name)


def test_asking_fewer_columns_skips_the_others_but_changes_none(btc):
    """``want`` drops hv_20/cmf_20/vpt and other columns not asked; the asked ones are unchanged."""
    want_out, _ = unfused(btc)
    names = ["bb_upper", "kc_middle", "mfi_14", "obv", "rsi_14", "cdl_doji", "sma_200", "macd_hist"]
    got = compute_batch(*btc.ohlcv, names=names)
    for name in names:
        np.testing.assert_array_equal(got[name], want_out[:, FEATURE_INDEX[name]], err_msg=name)
    frame = compute_frame(_frame(btc), names)
    for name in names:
        np.testing.assert_array_equal(frame[name].to_numpy(), want_out[:, FEATURE_INDEX[name]], err_msg=name)


def _frame(candles):
    import pandas as pd

    return pd.DataFrame({k: getattr(candles, k) for k in ("open_time", "open", "high", "low", "close", "volume")})


def test_two_thread_fused_history_leaves_the_same_state(real, monkeypatch):
    """The lanes share one state row (disjoint slices): its end state is the unfused one."""
    monkeypatch.setattr(batch, "PARALLEL_MIN_CANDLES", 0)
    assert batch._lanes_pool() is not None, "this check needs two CPUs"
    want_out, want_state = unfused(real)
    st = kernels.new_state(1)
    out = kernels.new_output(len(real.close))
    batch.run_history(st, 0, real.ohlcv, out, True)
    np.testing.assert_array_equal(out, want_out)
    np.testing.assert_array_equal(st[0], want_state)


def test_two_thread_path_still_checks_its_input(btc, monkeypatch):
    """A bad candle or open time raises on the two-thread path too."""
    from libs.indicators.validation import InvalidCandles

    monkeypatch.setattr(batch, "PARALLEL_MIN_CANDLES", 0)
    o, h, l, c, v = (a.copy() for a in btc.ohlcv)  # noqa: E741
    h[2000] = l[2000] / 2  # high below low
    with pytest.raises(InvalidCandles):
        compute_batch(o, h, l, c, v)
    with pytest.raises(InvalidCandles):
        compute_matrix(*btc.ohlcv, open_time=btc.open_time[::-1].copy())
