"""Indicator values for a chart window, from the features service's own kernels.

Charts never compute indicators themselves: the values drawn are the values
``features.v1`` publishes (same kernels, batch API), so a chart and the
models that read features agree on every number.
"""

from __future__ import annotations

import numpy as np

from libs.charting.presets import ANALYSIS, ChartPreset
from libs.charting.window import ChartInputError, ChartWindow, make_window
from libs.indicators.batch import compute_batch
from libs.indicators.catalog import FEATURES

# Candles computed before the first one shown, so the indicators are warmed up where the chart starts.
LOOKBACK = {f.name: f.lookback for f in FEATURES}
WARMUP = max(LOOKBACK[n] for n in ANALYSIS.indicator_names if n in LOOKBACK)


def window_with_indicators(
    symbol: str,
    interval: str,
    open_time: np.ndarray,
    open: np.ndarray,  # noqa: A002 - the candle field's name
    high: np.ndarray,
    low: np.ndarray,
    close: np.ndarray,
    volume: np.ndarray,
    preset: ChartPreset,
) -> ChartWindow:
    """All candles given, with the preset's indicators computed over all of them (pass
    ``preset.window + WARMUP`` candles to have every line warmed up from the left edge)."""
    names = list(preset.indicator_names)
    try:
        values = compute_batch(open, high, low, close, volume, names=names) if len(open_time) else {}
    except ValueError as exc:  # the features validators raise one-line ValueErrors
        raise ChartInputError(f"{symbol} {interval}: {exc}") from None
    return make_window(symbol, interval, open_time, open, high, low, close, volume, values)


def window_from_frame(frame, symbol: str, interval: str, preset: ChartPreset) -> ChartWindow:
    """A kline frame (``read_kline_frame``) -> window with indicators over every row."""
    cols = [frame[c].to_numpy(np.float64) for c in ("open", "high", "low", "close", "volume")]
    return window_with_indicators(symbol, interval, frame["open_time"].to_numpy(np.int64), *cols, preset=preset)
