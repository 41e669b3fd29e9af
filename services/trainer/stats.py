"""Small, dependency-free statistics the trainer's verdicts rest on (numpy and math only).

* ``student_t_cdf`` / ``student_t_ppf``: Student's t via the regularized incomplete beta function
  (continued fraction, Numerical Recipes' ``betacf``); the quantile by bisection.
* ``dm_test``: the Diebold-Mariano test of equal predictive accuracy on paired loss differences
  ``d_t = loss_model_t - loss_baseline_t``, with the Harvey-Leybourne-Newbold (1997) small-sample
  correction (statistic scaled by ``sqrt((n + 1 - 2h + h(h-1)/n) / n)``, compared with Student's t
  on ``n - 1`` degrees of freedom). The long-run variance of ``d`` is the textbook one
  (rectangular kernel, ``h - 1`` autocovariances) unless ``lags`` asks for a Bartlett (Newey-West)
  kernel with more lags: absolute errors of candle forecasts cluster with volatility, so their
  differences are autocorrelated even at ``h = 1``, and ignoring that overstates significance. The
  trainer uses Bartlett with ``newey_west_lags(n)`` lags; the textbook form is kept for reference.
  Also returns a confidence interval on the mean loss difference from the same variance.
* ``block_bootstrap_ci``: moving-block bootstrap percentile interval of any statistic of paired rows.
* ``conformal_quantile``: the split-conformal order statistic of calibration residuals.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np


def _betacf(a: float, b: float, x: float) -> float:
    eps, tiny = 3e-16, 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbeta) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbeta) * _betacf(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    if math.isnan(t):
        return float("nan")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def student_t_ppf(p: float, df: float) -> float:
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    lo, hi = -1.0, 1.0
    while student_t_cdf(lo, df) > p:
        lo *= 2.0
    while student_t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if student_t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, abs(mid)):
            break
    return 0.5 * (lo + hi)


def newey_west_lags(n: int) -> int:
    """The usual rule of thumb ``floor(4 (n / 100) ** (2/9))``."""
    return int(math.floor(4.0 * (n / 100.0) ** (2.0 / 9.0))) if n > 0 else 0


def long_run_variance(d: np.ndarray, lags: int, kernel: str = "rectangular") -> float:
    """``gamma_0 + 2 sum_k w_k gamma_k`` with ``gamma_k = (1/n) sum (d_t - mean)(d_{t-k} - mean)``."""
    d = np.asarray(d, dtype=np.float64)
    n = len(d)
    e = d - d.mean()
    v = float(e @ e) / n
    for k in range(1, min(lags, n - 1) + 1):
        w = 1.0 if kernel == "rectangular" else 1.0 - k / (lags + 1.0)
        v += 2.0 * w * float(e[k:] @ e[:-k]) / n
    return v


@dataclass(frozen=True)
class DMResult:
    n: int
    mean_diff: float  # mean of loss_model - loss_baseline (negative: the model's loss is lower)
    statistic: float  # HLN-corrected DM statistic
    p_less: float  # one-sided: H1 "the model's expected loss is lower"
    p_two_sided: float
    ci_low: float  # confidence interval on mean_diff, from the same (corrected) variance
    ci_high: float
    level: float  # confidence level of the interval
    horizon: int
    lags: int
    kernel: str

    def as_dict(self) -> dict:
        return asdict(self)


def dm_test(loss_model: np.ndarray, loss_baseline: np.ndarray, h: int = 1, lags: int | None = None,
            kernel: str = "rectangular", ci_level: float = 0.95) -> DMResult:
    """Diebold-Mariano with the Harvey-Leybourne-Newbold correction on paired losses.

    ``lags=None``: the textbook ``h - 1`` autocovariances with a rectangular kernel (if that
    variance is not positive, the Bartlett kernel with the same lags is used instead).
    """
    d = np.asarray(loss_model, dtype=np.float64) - np.asarray(loss_baseline, dtype=np.float64)
    d = d[np.isfinite(d)]
    n = len(d)
    lags = h - 1 if lags is None else lags
    nan = float("nan")
    if n < 3:
        return DMResult(n, float(d.mean()) if n else nan, nan, nan, nan, nan, nan, ci_level, h, lags, kernel)
    mean = float(d.mean())
    v = long_run_variance(d, lags, kernel)
    if v <= 0 and kernel == "rectangular":
        kernel = "bartlett"
        v = long_run_variance(d, lags, kernel)
    if v <= 0:  # every difference equal: no sampling variance at all
        stat = 0.0 if mean == 0 else math.copysign(math.inf, mean)
        p_less = 0.5 if mean == 0 else (0.0 if mean < 0 else 1.0)
        return DMResult(n, mean, stat, p_less, 1.0 if mean == 0 else 0.0, mean, mean, ci_level, h, lags, kernel)
    correction = math.sqrt(max((n + 1 - 2 * h + h * (h - 1) / n) / n, 1e-12))
    se = math.sqrt(v / n)
    stat = mean / se * correction
    df = n - 1
    p_less = student_t_cdf(stat, df)
    p_two = 2.0 * min(p_less, 1.0 - p_less)
    half = student_t_ppf(0.5 + ci_level / 2.0, df) * se / correction
    return DMResult(n, mean, stat, p_less, p_two, mean - half, mean + half, ci_level, h, lags, kernel)


def dm_test_hac(loss_model: np.ndarray, loss_baseline: np.ndarray, h: int = 1, ci_level: float = 0.95) -> DMResult:
    """What the trainer runs: HLN-corrected DM with a Bartlett long-run variance over
    ``max(h - 1, newey_west_lags(n))`` lags (robust to the volatility clustering of absolute errors)."""
    n = int(np.isfinite(np.asarray(loss_model) - np.asarray(loss_baseline)).sum())
    return dm_test(loss_model, loss_baseline, h=h, lags=max(h - 1, newey_west_lags(n)), kernel="bartlett", ci_level=ci_level)


def default_block(n: int) -> int:
    return max(1, int(round(n ** (1.0 / 3.0))))


def block_bootstrap_ci(columns: tuple[np.ndarray, ...], statistic: Callable[..., float], level: float = 0.95,
                       block: int | None = None, reps: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of ``statistic(*columns)`` under a moving-block bootstrap of the rows
    (the rows of every column resampled together, in blocks, so autocorrelation survives)."""
    cols = [np.asarray(c, dtype=np.float64) for c in columns]
    n = len(cols[0])
    if n == 0:
        return float("nan"), float("nan")
    b = min(block or default_block(n), n)
    k = math.ceil(n / b)
    rng = np.random.default_rng(seed)
    stats = np.empty(reps)
    offsets = np.arange(b)
    for r in range(reps):
        starts = rng.integers(0, n - b + 1, size=k)
        idx = (starts[:, None] + offsets[None, :]).ravel()[:n]
        stats[r] = statistic(*(c[idx] for c in cols))
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1.0 - alpha))


def mae_ratio_ci(err_model: np.ndarray, err_baseline: np.ndarray, level: float = 0.95, reps: int = 1000,
                 seed: int = 0) -> tuple[float, float, float]:
    """``(ratio, low, high)``: MAE(model) / MAE(baseline) with a moving-block bootstrap interval."""
    a, b = np.abs(np.asarray(err_model, dtype=np.float64)), np.abs(np.asarray(err_baseline, dtype=np.float64))
    ratio = float(a.mean() / b.mean()) if b.mean() > 0 else float("nan")
    lo, hi = block_bootstrap_ci((a, b), lambda x, y: x.mean() / y.mean(), level=level, reps=reps, seed=seed)
    return ratio, lo, hi


def conformal_quantile(residuals: np.ndarray, q: float) -> float:
    """Split-conformal quantile of ``n`` calibration residuals at level ``q``: the
    ``ceil((n + 1) q)``-th smallest for ``q >= 0.5``, the ``floor((n + 1) q)``-th smallest below
    (each clipped to 1..n), so a ``[q_lo, q_hi]`` band covers a new exchangeable point with
    probability at least ``q_hi - q_lo``."""
    r = np.sort(np.asarray(residuals, dtype=np.float64)[np.isfinite(residuals)])
    n = len(r)
    if n == 0:
        return float("nan")
    k = math.ceil((n + 1) * q) if q >= 0.5 else math.floor((n + 1) * q)
    return float(r[min(max(k, 1), n) - 1])
