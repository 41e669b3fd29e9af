"""The fast path: one prepared mplfinance figure per window length, data swapped in place.

``mplfinance.plot`` spends most of a chart building figures, axes, tickers and
artists. Here the figure is built once (by the plain path itself, from a
template window) and each chart only moves vertices, heights, colours and
limits on the artists that already exist, then re-draws and encodes. Every
limit comes from ``scales``, as in the plain path, so the pictures agree; the
tests and ``bench/bench_charts.py`` measure how closely.
"""

from __future__ import annotations

import matplotlib.dates as mdates
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.collections import PolyCollection

from services.charts import glyph_cache
from services.charts.figure import (
    BEAR_MARK,
    BULL_MARK,
    Handles,
    build_figure,
    save_png,
    title_text,
    volume_label,
)
from services.charts.presets import ENGULFING, HAMMER, MACD, MACD_HIST, MACD_SIGNAL, RSI, ChartPreset
from services.charts.scales import limits, pattern_marks
from services.charts.window import ChartWindow, check_window, make_window

TEMPLATE_START_MS = 1_700_000_000_000
MAX_PREPARED = 4  # window lengths kept prepared per worker; each figure holds a few MB


def template_window(n: int, interval: str = "1m") -> ChartWindow:
    """A window whose candles alternate up (even index) and down (odd index).

    The prepared figure is drawn from it, so its artists carry mplfinance's up colour at index 0
    and down colour at index 1; the fast path reads the colours from there instead of
    re-deriving mplfinance's colour rules.
    """
    i = np.arange(n)
    up = i % 2 == 0
    o = np.where(up, 100.0, 101.0)
    c = np.where(up, 101.0, 100.0)
    hist = np.where(up, 0.1, -0.1)
    zeros = np.zeros(n)
    return make_window(
        "TEMPLATE", interval, TEMPLATE_START_MS + i * 60_000, o, np.full(n, 102.0), np.full(n, 99.0), c,
        1.0 + i % 2,
        {"sma_20": np.full(n, 100.5), "ema_20": np.full(n, 100.4), MACD: hist, MACD_SIGNAL: hist / 2,
         MACD_HIST: hist, RSI: np.full(n, 50.0), HAMMER: zeros, ENGULFING: zeros},
    )


class _Bars:
    """Draws a row of bar Rectangles as one PolyCollection.

    Matplotlib draws each Rectangle as its own path (~0.2 ms apiece, 400 bars on a full chart);
    one collection with the same geometry, colours, line width and join style puts the same
    pixels down in one call. The Rectangles stay, hidden, as the record of what mplfinance drew.
    """

    def __init__(self, ax, bars: list) -> None:
        first = bars[0]
        self.x0 = np.array([b.get_x() for b in bars])
        self.width = first.get_width()
        self.bottom = first.get_y()
        self.coll = PolyCollection(
            self._verts(np.array([b.get_height() for b in bars])),
            facecolors=[b.get_facecolor() for b in bars],
            edgecolors=[b.get_edgecolor() for b in bars],
            # a Patch with an invisible edge draws with line width 0, which moves its pixel snapping
            linewidths=first.get_linewidth() if first.get_edgecolor()[3] > 0 else 0.0,
            joinstyle=first.get_joinstyle(),
            capstyle=first.get_capstyle(),
            antialiaseds=first.get_antialiased(),
            zorder=first.get_zorder(),
        )
        for b in bars:
            b.set_visible(False)
        ax.add_collection(self.coll, autolim=False)

    def _verts(self, heights: np.ndarray) -> np.ndarray:
        n = len(self.x0)
        v = np.empty((n, 4, 2))
        v[:, 0, 0] = v[:, 1, 0] = self.x0
        v[:, 2, 0] = v[:, 3, 0] = self.x0 + self.width
        v[:, 0, 1] = v[:, 3, 1] = self.bottom
        v[:, 1, 1] = v[:, 2, 1] = self.bottom + heights
        return v

    def update(self, heights: np.ndarray, face: np.ndarray, edge: np.ndarray | None = None) -> None:
        self.coll.set_verts(self._verts(heights))
        self.coll.set_facecolor(face)
        if edge is not None:
            self.coll.set_edgecolor(edge)


def _pair(colors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(up, down) RGBA rows from an artist's colour array (one row when both are equal)."""
    return colors[0], colors[min(1, len(colors) - 1)]


class _Prepared:
    def __init__(self, preset: ChartPreset, n: int) -> None:
        self.preset = preset
        self.n = n
        self.h: Handles = build_figure(template_window(n), preset, label_pool=preset.max_pattern_labels)
        h = self.h
        self.x = np.arange(n, dtype=np.float64)
        verts = h.bodies.get_paths()[0].vertices
        self.half_width = float(0.0 - verts[0, 0])
        self.body_face = _pair(h.bodies.get_facecolor())
        self.body_edge = _pair(h.bodies.get_edgecolor())
        self.wick = _pair(h.wicks.get_colors())
        if h.volume_bars:
            self.vol_face = (h.volume_bars[0].get_facecolor(), h.volume_bars[1].get_facecolor())
            self.vol_edge = (h.volume_bars[0].get_edgecolor(), h.volume_bars[1].get_edgecolor())
            self.volume = _Bars(h.volume_ax, h.volume_bars)
        for ax in h.fig.axes:
            if ax.xaxis.label.get_text() == "":
                # Placing an empty x label measures every tick label of all four shared x axes
                # (a sixth of a draw); an empty label draws nothing wherever it sits.
                ax.xaxis._update_label_position = lambda renderer: None
        if h.macd_bars:
            self.hist_face = (h.macd_bars[0].get_facecolor(), h.macd_bars[1].get_facecolor())
            self.hist = _Bars(h.macd_ax, h.macd_bars)

    def update(self, w: ChartWindow) -> None:
        p, h, x, n = self.preset, self.h, self.x, self.n
        marks = pattern_marks(w, p)
        lim = limits(w, p, marks)
        up = w.open < w.close  # mplfinance: up only when strictly above the open
        up_col = up[:, None]

        d = self.half_width
        verts = np.empty((n, 4, 2))
        verts[:, 0, 0] = verts[:, 1, 0] = x - d
        verts[:, 2, 0] = verts[:, 3, 0] = x + d
        verts[:, 0, 1] = verts[:, 3, 1] = w.open
        verts[:, 1, 1] = verts[:, 2, 1] = w.close
        h.bodies.set_verts(verts)
        h.bodies.set_facecolor(np.where(up_col, *self.body_face))
        h.bodies.set_edgecolor(np.where(up_col, *self.body_edge))
        segs = np.empty((2 * n, 2, 2))
        segs[:, :, 0] = np.concatenate([x, x])[:, None]
        segs[:n, 0, 1] = w.low
        segs[:n, 1, 1] = np.minimum(w.open, w.close)
        segs[n:, 0, 1] = w.high
        segs[n:, 1, 1] = np.maximum(w.open, w.close)
        h.wicks.set_segments(segs)
        wick = np.where(up_col, *self.wick)
        h.wicks.set_color(np.concatenate([wick, wick]))

        nan = np.full(n, np.nan)
        for line, name in zip(h.overlays, p.overlays):
            line.set_ydata(w.indicators.get(name, nan))
        for col, ys in zip(h.marks, (marks.bull_hammer, marks.bull_engulfing, marks.bear_engulfing)):
            col.set_offsets(np.ma.masked_invalid(np.column_stack([x, ys])))
        for i, t in enumerate(h.labels):
            if i < len(marks.labels):
                lx, ly, text, below = marks.labels[i]
                t.set_text(text)
                t.xy = (lx, ly)
                t.xyann = (0, -9 if below else 9)
                t.set_verticalalignment("top" if below else "bottom")
                t.set_color(BULL_MARK if below else BEAR_MARK)
                t.set_visible(True)
            else:
                t.set_visible(False)
        h.price_ax.set_ylim(*lim.price)

        if h.volume_ax is not None:
            self.volume.update(w.volume, np.where(up_col, *self.vol_face), np.where(up_col, *self.vol_edge))
            h.volume_ax.set_ylim(*lim.volume)
            fmt = h.volume_ax.yaxis.get_major_formatter()
            # as mplfinance's volume_exponent does: a fixed power of ten, or plain numbers
            if lim.volume_exponent > 0:
                fmt.set_scientific(True)
                fmt.set_powerlimits((lim.volume_exponent, lim.volume_exponent))
            else:
                fmt.set_scientific(False)
            if p.axis_text:
                h.volume_ax.set_ylabel(volume_label(lim.volume_exponent))
        if h.macd_ax is not None:
            for line, name in zip(h.macd_lines, (MACD, MACD_SIGNAL)):
                line.set_ydata(w.indicators.get(name, nan))
            hist = np.nan_to_num(w.indicators.get(MACD_HIST, nan), nan=0.0)
            self.hist.update(hist, np.where((hist >= 0)[:, None], *self.hist_face))
            h.macd_ax.set_ylim(*lim.macd)
        if h.rsi_line is not None:
            h.rsi_line.set_ydata(w.indicators.get(RSI, nan))
        if h.title is not None:
            h.title.set_text(title_text(w))
        h.formatter.dates = mdates.date2num(w.open_time.astype("datetime64[ms]"))

    def close(self) -> None:
        plt.close(self.h.fig)


class FastRenderer:
    """Renders charts of one preset by swapping data into prepared figures. Not thread-safe:
    one per worker process."""

    def __init__(self, preset: ChartPreset) -> None:
        self.preset = preset
        self._prepared: dict[int, _Prepared] = {}

    def render(self, w: ChartWindow) -> bytes:
        w = check_window(w, self.preset.window)
        prep = self._prepared.get(len(w))
        if prep is None:
            if len(self._prepared) >= MAX_PREPARED:
                self._prepared.pop(next(iter(self._prepared))).close()
            prep = self._prepared[len(w)] = _Prepared(self.preset, len(w))
        prep.update(w)
        glyph_cache.install(prep.h.fig.canvas.get_renderer())
        return save_png(prep.h.fig)

    def close(self) -> None:
        for prep in self._prepared.values():
            prep.close()
        self._prepared.clear()
