"""A caller-provided output matrix gets exactly the numbers a fresh one would."""

from __future__ import annotations

import numpy as np
import pytest
import talib

from libs.indicators import kernels
from libs.indicators.batch import compute_batch, compute_matrix
from libs.indicators.catalog import FEATURE_INDEX


def test_filled_buffer_equals_fresh_matrix_bit_for_bit(btc):
    n = len(btc.close)
    buf = np.full((n, kernels.N_FEATURES), 12345.0)  # stale values of a previous build
    got = compute_matrix(*btc.ohlcv, out=buf)
    assert got is buf
    np.testing.assert_array_equal(buf, compute_matrix(*btc.ohlcv))


def test_reused_buffer_serves_a_second_dataset(btc, eth_gaps):
    n = min(len(btc.close), len(eth_gaps.close))
    buf = kernels.new_output(n)
    compute_matrix(*(a[:n] for a in btc.ohlcv), out=buf)
    compute_matrix(*(a[:n] for a in eth_gaps.ohlcv), out=buf)
    rsi = talib.RSI(eth_gaps.close[:n], 14)
    np.testing.assert_allclose(buf[14:, FEATURE_INDEX["rsi_14"]], rsi[14:], rtol=0, atol=1e-9)
    assert np.isnan(buf[:14, FEATURE_INDEX["rsi_14"]]).all()


def test_subset_into_buffer_equals_subset_without(btc):
    names = ["macd", "obv", "cdl_engulfing"]
    buf = kernels.new_output(len(btc.close))
    got = compute_batch(*btc.ohlcv, names=names, out=buf)
    want = compute_batch(*btc.ohlcv, names=names)
    for name in names:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda n: np.empty((n - 1, kernels.N_FEATURES)), "shape"),
        (lambda n: np.empty((n, kernels.N_FEATURES), dtype=np.float32), "float64"),
        (lambda n: np.empty((kernels.N_FEATURES, n)).T, "C-contiguous"),
        (lambda n: [[0.0] * kernels.N_FEATURES] * n, "list"),
    ],
)
def test_unusable_buffer_is_refused_in_one_line(btc, make, message):
    with pytest.raises(ValueError, match=message):
        compute_matrix(*btc.ohlcv, out=make(len(btc.close)))


def test_read_only_buffer_is_refused(btc):
    buf = kernels.new_output(len(btc.close))
    buf.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        compute_matrix(*btc.ohlcv, out=buf)


def test_a_kept_buffer_is_reused_only_once_the_caller_dropped_it(btc, monkeypatch):
    """Fresh results reuse the previous call's buffer only when no returned array is alive."""
    from libs.indicators import batch

    monkeypatch.setattr(batch, "OUTPUT_MIN_CANDLES", 0)
    monkeypatch.setattr(batch, "REUSE_OUTPUT", True)
    batch.release_buffers()
    names = ["rsi_14", "bb_upper", "obv"]
    first = compute_batch(*btc.ohlcv, names=names)
    kept = {k: v.copy() for k, v in first.items()}
    other = compute_batch(*(x[::-1].copy() for x in btc.ohlcv), names=names)  # first still held
    for k in names:
        np.testing.assert_array_equal(first[k], kept[k])
        assert not np.shares_memory(first[k], other[k])
    kept_id = id(other["rsi_14"].base)  # the buffer kept now (first's is still held)
    del first, other
    again = compute_batch(*btc.ohlcv, names=names)
    assert id(again["rsi_14"].base) == kept_id  # reused
    for k in names:
        np.testing.assert_array_equal(again[k], kept[k])
    matrix = compute_matrix(*btc.ohlcv)
    assert compute_matrix(*btc.ohlcv) is not matrix
    batch.release_buffers()


def test_by_default_nothing_is_kept_between_calls(btc, monkeypatch):
    """A service with a memory limit must not hold a dropped result's buffer (opt-in only)."""
    from libs.indicators import batch

    monkeypatch.setattr(batch, "OUTPUT_MIN_CANDLES", 0)
    batch.release_buffers()
    first = compute_batch(*btc.ohlcv, names=["rsi_14"])
    matrix = compute_matrix(*btc.ohlcv)
    del first, matrix
    assert batch._spare == {}  # with REUSE_OUTPUT on, both shapes' buffers would be kept here

