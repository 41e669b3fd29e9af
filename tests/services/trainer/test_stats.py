"""services/trainer/stats.py against hand-computed values and closed forms (scipy where installed)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.trainer.stats import (
    block_bootstrap_ci,
    conformal_quantile,
    dm_test,
    dm_test_hac,
    long_run_variance,
    mae_ratio_ci,
    newey_west_lags,
    student_t_cdf,
    student_t_ppf,
)


def t3_cdf(x: float) -> float:
    """Closed form of Student's t with 3 degrees of freedom."""
    u = x / math.sqrt(3)
    return 0.5 + (u / (1 + x * x / 3) + math.atan(u)) / math.pi


@pytest.mark.parametrize("x", [-3.0, -0.7, 0.0, 0.4, 1.0, 2.5, 10.0])
def test_t_cdf_closed_forms(x):
    assert student_t_cdf(x, 1) == pytest.approx(0.5 + math.atan(x) / math.pi, abs=1e-12)  # Cauchy
    assert student_t_cdf(x, 2) == pytest.approx(0.5 + x / (2 * math.sqrt(2 + x * x)), abs=1e-12)
    assert student_t_cdf(x, 3) == pytest.approx(t3_cdf(x), abs=1e-12)


def test_t_ppf_inverts_closed_forms():
    assert student_t_ppf(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-9)  # 12.7062...
    # df = 2: x = (2p - 1) sqrt(2 / (4 p (1 - p)))
    p = 0.9
    assert student_t_ppf(p, 2) == pytest.approx((2 * p - 1) * math.sqrt(2 / (4 * p * (1 - p))), rel=1e-9)
    assert student_t_ppf(0.975, 1e6) == pytest.approx(1.959963984540054, rel=1e-5)  # -> normal


def test_dm_h1_by_hand():
    # d = [1, -1, 2, 0]: mean 0.5, gamma0 = (0.25 + 2.25 + 2.25 + 0.25) / 4 = 1.25, se = sqrt(1.25 / 4)
    # DM = 0.5 / 0.5590... = 0.894427; HLN factor sqrt((4 + 1 - 2) / 4) = sqrt(3) / 2 -> sqrt(0.6)
    r = dm_test(np.array([1.0, 0.0, 3.0, 1.0]), np.array([0.0, 1.0, 1.0, 1.0]))
    assert r.n == 4 and r.mean_diff == pytest.approx(0.5)
    assert r.statistic == pytest.approx(math.sqrt(0.6), rel=1e-12)
    assert r.p_less == pytest.approx(t3_cdf(math.sqrt(0.6)), rel=1e-10)
    assert r.p_two_sided == pytest.approx(2 * (1 - t3_cdf(math.sqrt(0.6))), rel=1e-10)
    # CI: mean -/+ t_{3, .975} * se / factor, t_{3, .975} = 3.182446305284263
    half = 3.182446305284263 * math.sqrt(1.25 / 4) / (math.sqrt(3) / 2)
    assert (r.ci_low, r.ci_high) == pytest.approx((0.5 - half, 0.5 + half), rel=1e-8)


def test_dm_h2_by_hand():
    # d = 1..6: gamma0 = 17.5 / 6, gamma1 = 8.75 / 6, V = gamma0 + 2 gamma1 = 35 / 6; se = sqrt(V / 6)
    # DM = 3.5 / se; HLN factor sqrt((6 + 1 - 4 + 2 / 6) / 6) -> statistic sqrt(7)
    d = np.arange(1.0, 7.0)
    assert long_run_variance(d, 1) == pytest.approx(35 / 6)
    r = dm_test(d, np.zeros(6), h=2)
    assert r.lags == 1 and r.kernel == "rectangular"
    assert r.statistic == pytest.approx(math.sqrt(7), rel=1e-12)
    scipy_stats = pytest.importorskip("scipy.stats")
    assert r.p_less == pytest.approx(scipy_stats.t.cdf(math.sqrt(7), 5), rel=1e-10)


def test_dm_rectangular_falls_back_to_bartlett_when_variance_not_positive():
    # d = [1, -1, 2, 0] with h = 2: gamma1 = -0.9375, rectangular V = 1.25 - 1.875 < 0;
    # Bartlett (w = 1/2): V = 1.25 - 0.9375 = 0.3125
    d = np.array([1.0, -1.0, 2.0, 0.0])
    assert long_run_variance(d, 1) == pytest.approx(-0.625)
    assert long_run_variance(d, 1, "bartlett") == pytest.approx(0.3125)
    r = dm_test(d, np.zeros(4), h=2)
    assert r.kernel == "bartlett"
    factor = math.sqrt((4 + 1 - 4 + 2 / 4) / 4)
    assert r.statistic == pytest.approx(0.5 / math.sqrt(0.3125 / 4) * factor, rel=1e-12)


def test_dm_direction_and_identical_losses():
    rng = np.random.default_rng(0)
    base = np.abs(rng.normal(size=500)) + 1.0
    better = base - 0.5 + 0.01 * rng.normal(size=500)
    r = dm_test_hac(better, base)
    assert r.mean_diff < 0 and r.p_less < 1e-6 and r.ci_high < 0
    assert r.lags == newey_west_lags(500) == 5
    same = dm_test(base, base)
    assert same.mean_diff == 0 and same.p_less == 0.5 and same.p_two_sided == 1.0


def test_conformal_quantile_order_statistics():
    r = np.arange(1.0, 10.0)  # n = 9: (n + 1) q = 10 q
    assert conformal_quantile(r, 0.9) == 9 and conformal_quantile(r, 0.1) == 1 and conformal_quantile(r, 0.5) == 5
    r = np.arange(1.0, 20.0)[::-1]  # n = 19, unsorted: ceil(20 * .9) = 18th, floor(20 * .1) = 2nd
    assert conformal_quantile(r, 0.9) == 18 and conformal_quantile(r, 0.1) == 2
    assert conformal_quantile(np.arange(1.0, 4.0), 0.9) == 3  # ceil(3.6) = 4 > n: clipped to the largest


def test_block_bootstrap_degenerate_cases():
    x = np.arange(50.0)
    # one block as long as the sample: every resample is the sample itself
    lo, hi = block_bootstrap_ci((x,), np.mean, block=50, reps=20)
    assert lo == pytest.approx(24.5) and hi == pytest.approx(24.5)
    a, b = np.full(40, 2.0), np.full(40, 4.0)
    assert mae_ratio_ci(a, b) == pytest.approx((0.5, 0.5, 0.5))


def test_block_bootstrap_interval_brackets_the_mean():
    rng = np.random.default_rng(1)
    x = rng.normal(10.0, 1.0, size=400)
    lo, hi = block_bootstrap_ci((x,), np.mean, reps=500)
    assert lo < x.mean() < hi and hi - lo < 0.5  # se ~ 0.05: a 95 % band ~ 0.2 wide
