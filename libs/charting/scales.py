"""Axis limits and pattern-mark positions, computed from the window alone.

Both render paths set every y-limit from here instead of letting matplotlib
autoscale, so a prepared figure that only swaps data draws exactly what a
fresh ``mplfinance.plot`` draws, and a flat or all-NaN series still gets a
sensible, non-degenerate axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from libs.charting.presets import ENGULFING, HAMMER, MACD, MACD_HIST, MACD_SIGNAL, ChartPreset
from libs.charting.window import ChartWindow

# Share of the price range left (below, above) the candles and their markers. On a chart with
# text the band above holds the one-row legend (lines and pattern glyphs), so it never covers a
# candle; a text-free dataset image keeps the classifier's original rule.
PRICE_PAD_TEXT = (0.04, 0.12)
PRICE_PAD_IMAGE = (0.09, 0.07)
MARK_GAP = 0.035  # distance of a pattern marker from its candle, as a share of the price range
# A bull engulfing on a hammer candle sits one more step out, so both markers show.
STACK_GAP = 2.4 * MARK_GAP
VOLUME_HEADROOM = 1.1
MACD_HEADROOM = 1.15
RSI_LIMITS = (0.0, 100.0)
FLAT_RELATIVE = 1e-3  # a flat market still gets +-0.1% of price of axis
TINY = 1e-12


@dataclass(frozen=True)
class PatternMarks:
    """y of each marker series (NaN where none) and which patterns the window holds.

    Every detected pattern gets a marker; names go in the legend, not beside each marker, so
    clustered patterns never put text over text or outside the axes.
    """

    bull_hammer: np.ndarray  # below the low
    bull_engulfing: np.ndarray  # below the low (below the hammer marker when both)
    bear_engulfing: np.ndarray  # above the high
    names: tuple[str, ...]  # distinct pattern names present, in PATTERN_NAMES order


# Marker series in drawing order, with the name the event and the legend use for each.
PATTERN_NAMES = ("hammer", "bullish_engulfing", "bearish_engulfing")


def _span(lo: float, hi: float) -> tuple[float, float]:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return 0.0, 1.0
    if hi - lo <= TINY * max(1.0, abs(hi)):
        half = max(abs(hi) * FLAT_RELATIVE, TINY)
        return lo - half, hi + half
    return lo, hi


def _finite_minmax(*arrays: np.ndarray) -> tuple[float, float]:
    lo, hi = math.inf, -math.inf
    for a in arrays:
        f = a[np.isfinite(a)]
        if f.size:
            lo = min(lo, float(f.min()))
            hi = max(hi, float(f.max()))
    return lo, hi


def candle_span(w: ChartWindow) -> tuple[float, float]:
    return _span(float(w.low.min()), float(w.high.max()))


def pattern_marks(w: ChartWindow, preset: ChartPreset) -> PatternMarks:
    n = len(w)
    nan = np.full(n, np.nan)
    if not preset.patterns:
        return PatternMarks(nan, nan.copy(), nan.copy(), ())
    lo, hi = candle_span(w)
    hammer = np.nan_to_num(w.indicators.get(HAMMER, nan), nan=0.0) != 0
    engulf = np.nan_to_num(w.indicators.get(ENGULFING, nan), nan=0.0)
    bull_h = np.where(hammer, w.low - MARK_GAP * (hi - lo), np.nan)
    bull_e = np.where(engulf > 0, w.low - np.where(hammer, STACK_GAP, MARK_GAP) * (hi - lo), np.nan)
    bear_e = np.where(engulf < 0, w.high + MARK_GAP * (hi - lo), np.nan)
    names = tuple(name for name, ys in zip(PATTERN_NAMES, (bull_h, bull_e, bear_e)) if np.isfinite(ys).any())
    return PatternMarks(bull_h, bull_e, bear_e, names)


@dataclass(frozen=True)
class Limits:
    price: tuple[float, float]
    volume: tuple[float, float]
    macd: tuple[float, float]
    rsi: tuple[float, float]
    volume_exponent: int  # the volume axis shows values / 10**exponent


def limits(w: ChartWindow, preset: ChartPreset, marks: PatternMarks) -> Limits:
    overlays = [w.indicators[name] for name in preset.overlays if name in w.indicators]
    lo, hi = _finite_minmax(w.low, w.high, *overlays, marks.bull_hammer, marks.bull_engulfing, marks.bear_engulfing)
    lo, hi = _span(lo, hi)
    vmax = float(w.volume.max()) if len(w) else 0.0
    volume = (0.0, vmax * VOLUME_HEADROOM) if vmax > 0 else (0.0, 1.0)
    m_lo, m_hi = _finite_minmax(*(w.indicators.get(k, np.empty(0)) for k in (MACD, MACD_SIGNAL, MACD_HIST)))
    m = max(abs(m_lo), abs(m_hi)) if math.isfinite(m_lo) else 0.0
    macd = (-m * MACD_HEADROOM, m * MACD_HEADROOM) if m > TINY else (-1.0, 1.0)
    below, above = PRICE_PAD_TEXT if preset.axis_text else PRICE_PAD_IMAGE
    return Limits(
        price=(lo - below * (hi - lo), hi + above * (hi - lo)),
        volume=volume,
        macd=macd,
        rsi=RSI_LIMITS,
        volume_exponent=volume_exponent(vmax),
    )


def volume_exponent(vmax: float) -> int:
    """Engineering exponent (multiple of 3) that keeps volume tick labels short; 0 below 10k."""
    if vmax < 1e4:
        return 0
    return 3 * int(math.floor(math.log10(vmax) / 3))
