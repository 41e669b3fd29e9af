"""libs/indicators/simd.py: the packed forms give the scalar kernels' doubles, lane for lane."""

from __future__ import annotations

import numpy as np
from numba import njit

from libs.indicators import kernels, simd


@njit(cache=False)
def _window_vs_ring(c, mean):
    """sq_dev20_window at every candle i >= 40 against kernels._sq_dev20 over the ring it stands for."""
    ring = np.empty(20)
    bad = -1
    for i in range(c.shape[0]):
        ring[i % 20] = c[i]
        if i >= 40 and i + 20 <= c.shape[0]:
            m = mean[i]
            if simd.sq_dev20_window(c, i, i % 20, m) != kernels._sq_dev20(ring, 0, m):
                bad = i
    return bad


@njit(cache=False)
def _packed_div(a, b):
    q = simd.vdiv((a[0], a[1], a[2], a[3], a[4]), (b[0], b[1], b[2], b[3], b[4]))
    return np.array([q[0], q[1], q[2], q[3], q[4]])


def test_sq_dev20_window_equals_the_ring_pass():
    rng = np.random.default_rng(7)
    c = np.exp(rng.normal(0.0, 0.01, 5000).cumsum()) * 64000.0  # price-like, every slot phase
    mean = c + rng.normal(0.0, 5.0, c.shape[0])
    assert _window_vs_ring(c, mean) == -1


def test_vdiv_equals_scalar_division():
    rng = np.random.default_rng(3)
    for _ in range(200):
        a = rng.normal(0.0, 1e4, 5)
        b = rng.normal(0.0, 10.0, 5)
        b[rng.integers(0, 5)] = 0.0  # inf / nan lanes too
        with np.errstate(divide="ignore", invalid="ignore"):
            np.testing.assert_array_equal(_packed_div(a, b), a / b)


@njit(cache=False)
def _sum_window_vs_ring(c):
    ring = np.empty(20)
    bad = -1
    for i in range(c.shape[0]):
        ring[i % 20] = c[i]
        if i >= 40 and i + 20 <= c.shape[0]:
            if simd.sum20_window(c, i, i % 20) != kernels._sum20(ring, 0):
                bad = i
    return bad


def test_sum20_window_equals_the_ring_sum():
    rng = np.random.default_rng(11)
    assert _sum_window_vs_ring(rng.normal(0.0, 1e-3, 5000)) == -1  # log-return-like, mixed signs


@njit(cache=False)
def _extremes(a):
    hi = np.empty(a.shape[0])
    lo = np.empty(a.shape[0])
    for i in range(13, a.shape[0]):
        hi[i] = simd.max14(a, i)
        lo[i] = simd.min14(a, i)
    return hi, lo


def test_window_max_min_equal_numpys():
    rng = np.random.default_rng(5)
    a = np.round(np.exp(rng.normal(0.0, 0.01, 3000).cumsum()) * 100.0, 1)  # ties too
    hi, lo = _extremes(a)
    win = np.lib.stride_tricks.sliding_window_view(a, 14)
    np.testing.assert_array_equal(hi[13:], win.max(axis=1))
    np.testing.assert_array_equal(lo[13:], win.min(axis=1))
