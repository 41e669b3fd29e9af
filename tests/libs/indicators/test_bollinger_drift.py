"""Bollinger bands must not drift on long series far from zero (no running sum of squares)."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from libs.indicators.batch import compute_batch


def test_no_drift_on_a_long_series_with_a_large_offset():
    rng = np.random.default_rng(7)
    n = 300_000
    close = 1e5 + np.cumsum(rng.normal(0.0, 0.01, n))  # prices ~1e5, tiny moves: worst case for sum of x^2
    high, low = close + 0.005, close - 0.005
    got = compute_batch(close, high, low, close, np.ones(n), names=["bb_upper", "bb_middle", "bb_lower"])
    tail = slice(n - 5000, n)
    win = sliding_window_view(close, 20)[tail.start - 19 : tail.stop - 19]
    mean = win.mean(axis=1)
    sigma = np.sqrt(((win - mean[:, None]) ** 2).mean(axis=1))
    assert np.abs(got["bb_middle"][tail] - mean).max() <= 1e-9
    assert np.abs(got["bb_upper"][tail] - (mean + 2 * sigma)).max() <= 1e-9
    assert np.abs(got["bb_lower"][tail] - (mean - 2 * sigma)).max() <= 1e-9
    # the data is adversarial: a running sum of squares (E[x^2] - E[x]^2) is visibly off on it
    s1, s2 = np.cumsum(close), np.cumsum(close * close)
    end = np.arange(tail.start, tail.stop)
    m = (s1[end] - s1[end - 20]) / 20
    naive_sigma = np.sqrt(np.maximum((s2[end] - s2[end - 20]) / 20 - m * m, 0.0))
    assert np.abs(naive_sigma - sigma).max() > 1e-3
