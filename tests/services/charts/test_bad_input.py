"""Too few candles, NaNs, a flat market: a chart or one clear error, never a crash."""

from __future__ import annotations

import numpy as np
import pytest

from libs.charting.fast import FastRenderer
from libs.charting.figure import render_plain
from libs.charting.indicators import window_with_indicators
from libs.charting.presets import ANALYSIS, get_preset
from libs.charting.window import ChartInputError, check_window, make_window

from tests.libs.charting.conftest import pixels, rms


def _replace(w, **arrays):
    fields = {k: getattr(w, k) for k in ("open_time", "open", "high", "low", "close", "volume")}
    fields.update(arrays)
    return make_window(w.symbol, w.interval, **fields, indicators=w.indicators)


def test_too_few_candles_is_a_clear_error(full):
    with pytest.raises(ChartInputError, match="need 60 candles for the window, have 12"):
        FastRenderer(ANALYSIS).render(full.slice(0, 12))


def test_nan_price_is_a_clear_error(full):
    close = full.close.copy()
    close[-3] = np.nan
    with pytest.raises(ChartInputError, match=r"close is not a finite number at open_time=\d+"):
        FastRenderer(ANALYSIS).render(_replace(full, close=close))


def test_nan_candles_refused_by_indicator_kernels_with_one_line(full):
    close = full.close.copy()
    close[5] = np.nan
    with pytest.raises(ChartInputError) as err:
        window_with_indicators("BTCUSDT", "1m", full.open_time, full.open, full.high, full.low, close, full.volume, ANALYSIS)
    assert "\n" not in str(err.value)


def test_flat_market_renders_the_same_both_ways(full):
    n = 60
    price = np.full(n, 70000.0)
    w = window_with_indicators("BTCUSDT", "1m", full.open_time[:n], price, price, price, price, np.zeros(n), ANALYSIS)
    fast = FastRenderer(ANALYSIS).render(w)
    assert pixels(fast).shape == (750, 1000, 3)
    assert rms(fast, render_plain(check_window(w, n), ANALYSIS)) <= 0.5


def test_warm_up_nans_render(full):
    """60 candles alone: MACD signal (33 candles of warm-up) starts mid-chart; NaN is not an error."""
    w = window_with_indicators(
        "BTCUSDT", "1m", full.open_time[:60], full.open[:60], full.high[:60], full.low[:60], full.close[:60],
        full.volume[:60], ANALYSIS,
    )
    assert np.isnan(w.indicators["macd_signal"][:30]).all()
    png = FastRenderer(ANALYSIS).render(w)
    assert rms(png, render_plain(w, ANALYSIS)) <= 0.5


def test_unknown_preset_and_bad_sizes():
    with pytest.raises(ChartInputError, match="unknown chart preset 'nope'"):
        get_preset("nope")
    with pytest.raises(ChartInputError, match="window must be"):
        ANALYSIS.sized(window=1)
    with pytest.raises(ChartInputError, match="chart size must be"):
        ANALYSIS.sized(width_px=10)


def test_mismatched_lengths():
    with pytest.raises(ChartInputError, match="close has 2 values for 3 candles"):
        make_window("BTCUSDT", "1m", [1, 2, 3], [1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1], [1, 1, 1])
