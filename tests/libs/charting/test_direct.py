"""The direct path draws the classifier's training images exactly as the artist paths do.

Exactly: the same PNG bytes as ``FastRenderer`` (the path every classifier dataset so far was
rendered with) and the same pixels as plain ``mplfinance.plot``, no tolerance. Both replay the
same Agg calls with the same arguments, so any difference at all is a bug, not anti-aliasing
drift. Real candles: every shipped kline file (tests/data/klines).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from libs.common.klines import read_kline_frame
from libs.charting import direct as direct_module
from libs.charting import pool as pool_module
from libs.charting.direct import DirectRenderer, UnsupportedChart, supports
from libs.charting.fast import FastRenderer
from libs.charting.figure import render_plain
from libs.charting.indicators import window_from_frame
from libs.charting.presets import ANALYSIS, CLASSIFIER224
from libs.charting.window import ChartInputError, check_window, make_window

from tests.libs.charting.conftest import pixels

KLINES = Path(__file__).resolve().parents[2] / "data" / "klines"
FILES = [  # (file, symbol, interval, stride over its windows)
    ("charts-BTCUSDT-1m-2026-03-23-head300.csv.gz", "BTCUSDT", "1m", 1),
    ("AVAXUSDT-1m-2026-04-01-futures-um-head60.csv.gz", "AVAXUSDT", "1m", 1),
    ("BTCUSDT-15m-2023-04-01-head3000.csv.gz", "BTCUSDT", "15m", 9),
    ("DOGEUSDT-15m-2023-04-01-head3000.csv.gz", "DOGEUSDT", "15m", 9),  # ~0.08 USDT: tiny price steps
    ("ETHUSDT-1h-2021-04-04-head3000.csv.gz", "ETHUSDT", "1h", 9),  # holds real outage gaps
]


def _full(name: str, symbol: str, interval: str, preset=CLASSIFIER224):
    return window_from_frame(read_kline_frame(KLINES / name, symbol, interval), symbol, interval, preset)


def _windows(full, preset, stride: int):
    return [full.slice(end - preset.window, end) for end in range(preset.window, len(full) + 1, stride)]


@pytest.mark.parametrize("name, symbol, interval, stride", FILES, ids=[f[0].split("-")[0] + "-" + f[2] for f in FILES])
def test_same_png_bytes_as_fast_path_on_shipped_candles(name, symbol, interval, stride):
    full = _full(name, symbol, interval)
    fast, direct = FastRenderer(CLASSIFIER224), DirectRenderer(CLASSIFIER224)
    windows = _windows(full, CLASSIFIER224, stride)
    assert len(windows) >= 31  # the first ones with warm-up NaN in the SMA/EMA lines, then warm
    for w in windows:
        assert direct.render(w) == fast.render(w), (symbol, interval, w.last_open_time)


def test_same_pixels_as_plain_mplfinance():
    """Against a fresh ``mplfinance.plot`` figure per chart (the reference look), on windows from
    every file: warm-up NaNs in the lines, an outage gap, a low-priced symbol."""
    direct = DirectRenderer(CLASSIFIER224)
    for name, symbol, interval, _ in FILES:
        full = _full(name, symbol, interval)
        for end in sorted({30, 45, len(full) // 2, len(full)}):
            w = check_window(full.slice(0, end), CLASSIFIER224.window)
            np.testing.assert_array_equal(direct.pixels(w), pixels(render_plain(w, CLASSIFIER224)).astype(np.uint8))


@pytest.mark.parametrize("preset", [
    CLASSIFIER224.sized(window=60),
    CLASSIFIER224.sized(window=150, width_px=320, height_px=240),  # >=128 points: matplotlib simplifies the lines
    replace(CLASSIFIER224, volume=False),
    replace(CLASSIFIER224, overlays=()),
], ids=["window60", "window150-320x240", "no-volume", "no-overlays"])
def test_other_text_free_presets(preset):
    full = _full("BTCUSDT-15m-2023-04-01-head3000.csv.gz", "BTCUSDT", "15m", preset)
    fast, direct = FastRenderer(preset), DirectRenderer(preset)
    for end in (preset.window, 400, 1700, len(full)):
        w = check_window(full.slice(0, end), preset.window)
        png = direct.render(w)
        assert png == fast.render(w)
        np.testing.assert_array_equal(pixels(png), pixels(render_plain(w, preset)))


def test_flat_market_and_missing_indicators():
    n = CLASSIFIER224.window
    t = 1_700_000_000_000 + 60_000 * np.arange(n)
    flat = make_window("FLATUSDT", "1m", t, np.full(n, 5.0), np.full(n, 5.0), np.full(n, 5.0), np.full(n, 5.0),
                       np.zeros(n))  # no indicators at all, no volume, no range
    full = _full("charts-BTCUSDT-1m-2026-03-23-head300.csv.gz", "BTCUSDT", "1m")
    doji = full.slice(200, 230)
    doji = make_window(doji.symbol, doji.interval, doji.open_time, doji.close, doji.high, doji.low, doji.close,
                       doji.volume, doji.indicators)  # open == close everywhere: every candle "down"
    direct = DirectRenderer(CLASSIFIER224)
    for w in (flat, doji):
        np.testing.assert_array_equal(direct.pixels(w), pixels(render_plain(w, CLASSIFIER224)).astype(np.uint8))


def test_successive_charts_leave_nothing_behind():
    """Each chart starts from a clean canvas and fresh transforms, in any order of windows."""
    full = _full("charts-BTCUSDT-1m-2026-03-23-head300.csv.gz", "BTCUSDT", "1m")
    direct = DirectRenderer(CLASSIFIER224)
    a, b = full.slice(100, 130), full.slice(250, 280)
    first = direct.render(a)
    assert direct.render(b) != first
    assert direct.render(a) == first == DirectRenderer(CLASSIFIER224).render(a)


def test_refuses_what_it_does_not_draw():
    assert supports(CLASSIFIER224) and not supports(ANALYSIS)
    for p in (ANALYSIS, replace(CLASSIFIER224, rsi=True), replace(CLASSIFIER224, patterns=True)):
        with pytest.raises(UnsupportedChart):
            DirectRenderer(p)
    full = _full("charts-BTCUSDT-1m-2026-03-23-head300.csv.gz", "BTCUSDT", "1m")
    with pytest.raises(ChartInputError, match="need 30 candles for the window, have 10"):
        DirectRenderer(CLASSIFIER224).render(full.slice(0, 10))


def test_pool_picks_direct_and_falls_back_to_the_artist_path(monkeypatch):
    assert isinstance(pool_module.renderer_for(CLASSIFIER224), DirectRenderer)
    assert isinstance(pool_module.renderer_for(ANALYSIS), FastRenderer)
    w = check_window(_full("charts-BTCUSDT-1m-2026-03-23-head300.csv.gz", "BTCUSDT", "1m"), CLASSIFIER224.window)
    expected = FastRenderer(CLASSIFIER224).render(w)

    def refuse(self, c, *a):
        raise UnsupportedChart("a figure that makes a call the direct path does not know")

    monkeypatch.setattr(direct_module._Plan, "_step", refuse)
    monkeypatch.setattr(pool_module, "_renderers", {})
    assert pool_module.render_in_worker(w, CLASSIFIER224) == expected
    assert isinstance(pool_module._renderers[CLASSIFIER224], FastRenderer)
