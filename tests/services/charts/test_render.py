"""The picture is right: reference images, and the parts a reader needs are where they belong."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
import talib
from matplotlib.colors import to_rgb

from services.charts.fast import FastRenderer
from services.charts.figure import RSI_GUIDES, build_figure, render_plain
from services.charts.presets import ANALYSIS, CLASSIFIER224
from services.charts.window import check_window

from .conftest import REFERENCE, pixels, rms

REFERENCE_RMS = 3.0  # grey levels; absorbs FreeType/Agg anti-aliasing drift between builds


@pytest.mark.parametrize(
    "name, preset",
    [("analysis-60", ANALYSIS.sized(width_px=900, height_px=675)), ("classifier224-30", CLASSIFIER224)],
)
def test_matches_committed_reference(full, name, preset):
    w = check_window(full, preset.window)
    reference = (REFERENCE / f"BTCUSDT-1m-{name}.png").read_bytes()
    assert rms(render_plain(w, preset), reference) < REFERENCE_RMS
    assert rms(FastRenderer(preset).render(w), reference) < REFERENCE_RMS


def test_reference_differs_from_another_window(full):
    """The tolerance is tight enough to tell two windows of the same market apart."""
    preset = ANALYSIS.sized(width_px=900, height_px=675)
    other = render_plain(check_window(full.slice(0, 200), preset.window), preset)
    assert rms(other, (REFERENCE / "BTCUSDT-1m-analysis-60.png").read_bytes()) > 4 * REFERENCE_RMS


def test_size_is_exact(full):
    assert pixels(FastRenderer(CLASSIFIER224).render(full)).shape == (224, 224, 3)
    p = ANALYSIS.sized(width_px=640, height_px=480)
    assert pixels(render_plain(check_window(full, 60), p)).shape == (480, 640, 3)


def test_candles_overlays_panels_and_markers_present(full):
    w = check_window(full, 60)
    h = build_figure(w, ANALYSIS)
    try:
        # one body and two wick segments per candle, at the real prices
        assert len(h.bodies.get_paths()) == 60
        assert len(h.wicks.get_segments()) == 120
        body = h.bodies.get_paths()[-1].vertices
        assert {round(body[0, 1], 2), round(body[1, 1], 2)} == {round(w.open[-1], 2), round(w.close[-1], 2)}
        # SMA/EMA drawn with the values TA-Lib gives for the same closes (independent reference)
        closes = full.close
        sma = talib.SMA(closes, 20)[-60:]
        ema = talib.EMA(closes, 20)[-60:]
        np.testing.assert_allclose(h.overlays[0].get_ydata(), sma, rtol=1e-9)
        np.testing.assert_allclose(h.overlays[1].get_ydata(), ema, rtol=1e-6)
        # both panels: MACD line + signal + histogram bars; RSI with 30/70 guides
        m, s, hist = talib.MACD(closes)
        np.testing.assert_allclose(h.macd_lines[0].get_ydata(), m[-60:], rtol=1e-6, atol=1e-6)
        assert len(h.macd_bars) == 60
        np.testing.assert_allclose(h.rsi_line.get_ydata(), talib.RSI(closes, 14)[-60:], rtol=1e-6)
        guides = sorted(float(line.get_ydata()[0]) for line in h.rsi_ax.lines[1:])
        assert guides == sorted(RSI_GUIDES) == [30.0, 70.0]
        assert h.rsi_ax.get_ylim() == (0.0, 100.0)
        # pattern markers where TA-Lib finds hammers/engulfings in these candles
        o, hi, lo, c = (getattr(full, k) for k in ("open", "high", "low", "close"))
        hammer = talib.CDLHAMMER(o, hi, lo, c)[-60:] != 0
        engulf = talib.CDLENGULFING(o, hi, lo, c)[-60:]
        marked = [np.flatnonzero(~np.ma.getmaskarray(col.get_offsets()[:, 1])) for col in h.marks]
        assert set(marked[0]) == set(np.flatnonzero(hammer))
        assert set(marked[1]) == set(np.flatnonzero((engulf > 0) & ~hammer))
        assert set(marked[2]) == set(np.flatnonzero(engulf < 0))
        assert hammer.any() and (engulf != 0).any()  # this slice really has both patterns
        texts = [t.get_text() for t in h.labels if t.get_visible()]
        assert any("Hammer" in t for t in texts) and any("engulfing" in t for t in texts)
        assert h.title.get_text().startswith("BTCUSDT 1m")
    finally:
        plt.close(h.fig)


def test_candle_colours_at_their_pixels(full):
    """Sample the PNG in the middle of the tallest up and down bodies: mplfinance's binance colours."""
    w = check_window(full, 60)
    h = build_figure(w, ANALYSIS)
    try:
        img = pixels(FastRenderer(ANALYSIS).render(w))
        to_px = h.price_ax.transData
        height = img.shape[0]
        for want_up, colour in ((True, "#70a800"), (False, "#ea0070")):
            body = np.abs(w.close - w.open) * np.where((w.close > w.open) == want_up, 1, 0)
            i = int(np.argmax(body))
            x, y0 = to_px.transform((i, min(w.open[i], w.close[i])))
            _, y1 = to_px.transform((i, max(w.open[i], w.close[i])))
            column = img[int(height - y1) + 2 : int(height - y0) - 2, int(round(x))]
            # the body's usual colour (lines or grid may cross it at a few pixels)
            colours, counts = np.unique(column, axis=0, return_counts=True)
            got = colours[np.argmax(counts)] / 255
            behind = np.array(h.price_ax.get_facecolor()[:3])
            expect = np.array(to_rgb(colour)) * 0.9 + behind * 0.1  # alpha 0.9 over the axes background
            np.testing.assert_allclose(got, expect, atol=0.04)
    finally:
        plt.close(h.fig)
