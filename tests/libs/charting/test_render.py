"""The picture is right: reference images, and the parts a reader needs are where they belong."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
import talib
from matplotlib.colors import to_rgb

from libs.charting.fast import FastRenderer
from libs.charting.figure import RSI_GUIDES, build_figure, render_plain
from libs.charting.presets import ANALYSIS, CLASSIFIER224
from libs.charting.window import check_window

from tests.libs.charting.conftest import REFERENCE, pixels, rms

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
        # every detected pattern keeps its marker, also where two share a candle
        assert set(marked[0]) == set(np.flatnonzero(hammer))
        assert set(marked[1]) == set(np.flatnonzero(engulf > 0))
        assert set(marked[2]) == set(np.flatnonzero(engulf < 0))
        assert hammer.any() and (engulf != 0).any()  # this slice really has both patterns
        assert (hammer & (engulf > 0)).any()  # ... and a candle with a hammer and a bull engulfing
        # the legend names exactly the patterns the window holds, beside the two overlays
        texts = [t.get_text() for t in h.legend.get_texts() if t.get_visible()]
        expected = [name for name, present in (("Hammer", hammer.any()), ("Bull engulfing", (engulf > 0).any()),
                                               ("Bear engulfing", (engulf < 0).any())) if present]
        assert texts == ["SMA 20", "EMA 20", *expected]
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


def _marker_px(h, i: int) -> np.ndarray:
    """Pixel centres of marker series ``i`` (rows where it has a marker)."""
    xy = np.ma.filled(h.marks[i].get_offsets().astype(float), np.nan)
    xy = xy[np.isfinite(xy[:, 1])]
    return h.price_ax.transData.transform(xy)


@pytest.mark.parametrize("window, size", [(60, (900, 675)), (60, (640, 480)), (200, (1000, 750))])
def test_pattern_annotations_readable(full, window, size):
    """Names sit in one legend inside the price panel, above every candle and marker; markers
    that share a candle do not cover each other; date labels do not run into each other."""
    preset = ANALYSIS.sized(window=window, width_px=size[0], height_px=size[1])
    w = check_window(full, window)
    h = build_figure(w, preset)
    try:
        h.fig.canvas.draw()
        renderer = h.fig.canvas.get_renderer()
        axes_box = h.price_ax.get_window_extent(renderer)
        legend_box = h.legend.get_window_extent(renderer)
        assert axes_box.x0 <= legend_box.x0 and legend_box.x1 <= axes_box.x1
        assert axes_box.y0 <= legend_box.y0 and legend_box.y1 <= axes_box.y1
        _, top_candle = h.price_ax.transData.transform((0, float(w.high.max())))
        tops = [top_candle] + [float(_marker_px(h, i)[:, 1].max() + np.sqrt(h.marks[i].get_sizes()[0]) / 2)
                               for i in range(3) if len(_marker_px(h, i))]
        assert legend_box.y0 >= max(tops)
        # no text anywhere in the price panel but the legend's (nothing to overlap or clip)
        free_text = [t for t in h.price_ax.texts if t.get_visible() and t.get_text()]
        assert free_text == []
        # the date labels under the bottom panel stand apart
        bottom = h.rsi_ax.xaxis
        boxes = sorted((t.label1.get_window_extent(renderer) for t in bottom._update_ticks() if t.label1.get_text()),
                       key=lambda b: b.x0)
        assert len(boxes) >= 3
        assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:]))
        hammer_px, bull_px = _marker_px(h, 0), _marker_px(h, 1)
        shared = np.isin(hammer_px[:, 0].round(3), bull_px[:, 0].round(3))
        radius_px = (np.sqrt(h.marks[0].get_sizes()[0]) + np.sqrt(h.marks[1].get_sizes()[0])) / 2 * h.fig.dpi / 72
        for x, y in hammer_px[shared]:
            below = bull_px[np.isclose(bull_px[:, 0], x)][0]
            assert y - below[1] >= radius_px
    finally:
        plt.close(h.fig)
