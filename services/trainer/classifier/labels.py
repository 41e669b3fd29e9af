"""Classes from the next candle's move, with a neutral band scaled by recent volatility.

A sample is the chart whose last candle is row ``i``; its class is the move of the next
candle's close: ``r = close[i+1] / close[i] - 1``. The neutral band is
``NEUTRAL_ATR_MULTIPLE * atr_14[i] / close[i]``: a fixed return would call most 1m moves neutral
and most 1d moves directional, and it would drift with the volatility regime; a multiple of the
recent average true range means the same thing on every interval and every year. 0.2 ATR puts
close to a third of BTCUSDT 1h candles in each class (7951 / 7775 / 8061 over 2021-04..2023-12;
docs/chart-classifier.md lists the counts on other data).

The regression target is the next close as a scaled return, ``(next_close / close - 1) /
scale``, ``scale`` being the standard deviation of that return on the training split (so the
two loss terms are of the same order and the head works for any price level). Serving turns
it back: ``next_close = close * (1 + y * scale)``; persistence is ``y = 0``.
"""

from __future__ import annotations

import numpy as np

BEARISH, NEUTRAL, BULLISH = 0, 1, 2
CLASS_NAMES = ("bearish", "neutral", "bullish")
NEUTRAL_ATR_MULTIPLE = 0.2
ATR_FEATURE = "atr_14"


def classify_moves(ret: np.ndarray, band: np.ndarray) -> np.ndarray:
    """0/1/2 for each return against its band (NaN return or band -> -1, unusable)."""
    out = np.where(ret > band, BULLISH, np.where(ret < -band, BEARISH, NEUTRAL)).astype(np.int64)
    out[~(np.isfinite(ret) & np.isfinite(band))] = -1
    return out


def neutral_band(close: np.ndarray, atr: np.ndarray, multiple: float = NEUTRAL_ATR_MULTIPLE) -> np.ndarray:
    if multiple < 0:
        raise ValueError(f"neutral band multiple must be >= 0, got {multiple}")
    return multiple * atr / close


def class_counts(labels: np.ndarray) -> dict[str, int]:
    return {name: int((labels == k).sum()) for k, name in enumerate(CLASS_NAMES)}


def return_scale(close: np.ndarray, next_close: np.ndarray) -> float:
    """The training split's standard deviation of the next-candle return (fitted on train only)."""
    r = next_close / close - 1.0
    s = float(np.std(r))
    if not np.isfinite(s) or s <= 0:
        raise ValueError("cannot scale the next-close target: the training returns have no spread")
    return s


def scale_target(close: np.ndarray, next_close: np.ndarray, scale: float) -> np.ndarray:
    return (next_close / close - 1.0) / scale


def unscale_target(close: np.ndarray, y: np.ndarray, scale: float) -> np.ndarray:
    return close * (1.0 + y * scale)
