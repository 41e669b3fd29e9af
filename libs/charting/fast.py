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
from matplotlib.collections import Collection, LineCollection, PolyCollection
from matplotlib.path import Path

from libs.charting import glyph_cache
from libs.charting.figure import (
    Handles,
    build_figure,
    chart_legend,
    save_png,
    title_text,
    volume_label,
)
from libs.charting.presets import ENGULFING, HAMMER, MACD, MACD_HIST, MACD_SIGNAL, RSI, ChartPreset
from libs.charting.scales import limits, pattern_marks
from libs.charting.window import ChartWindow, check_window, make_window

TEMPLATE_START_MS = 1_700_000_000_000
# Axis._update_ticks keeps a tick whose position is within this share of the view's span
# outside it (matplotlib.transforms._interval_contains_close).
VIEW_RTOL = 1e-10
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


class _PathsInPlace:
    """A collection's paths as views into one array that each chart overwrites.

    ``set_verts``/``set_segments`` build a Path object per candle per chart (400 wick segments
    alone cost ~8 ms). Paths built once, the way those methods build them (same codes, same
    closing vertex), with their vertices rewritten in place, draw the same pixels.
    """

    def __init__(self, coll: Collection, count: int, points: int, closed: bool) -> None:
        self.coll = coll
        self.closed = closed
        self.v = np.zeros((count, points + 1 if closed else points, 2))
        if closed:
            codes = Path(self.v[0], closed=True).codes
            paths = [Path(xy, codes) for xy in self.v]
        else:
            paths = [Path(xy) for xy in self.v]
        Collection.set_paths(coll, paths)

    def write(self, verts: np.ndarray) -> None:
        points = verts.shape[1]
        self.v[:, :points] = verts
        if self.closed:
            self.v[:, points] = verts[:, 0]
        self.coll.stale = True


class _Bars:
    """Draws a row of bar Rectangles as one PolyCollection.

    Matplotlib draws each Rectangle as its own path (~0.2 ms apiece, 400 bars on a full chart);
    one collection with the same geometry, colours, line width and join style puts the same
    pixels down in one call. The Rectangles leave the axes; ``Handles`` keeps them as the record
    of what mplfinance drew.
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
            # out of the axes, not just hidden: 400 idle artists cost ~5 ms a draw to sort and skip
            b.remove()
        ax.add_collection(self.coll, autolim=False)
        self.paths = _PathsInPlace(self.coll, len(bars), 4, closed=True)

    def _verts(self, heights: np.ndarray) -> np.ndarray:
        n = len(self.x0)
        v = np.empty((n, 4, 2))
        v[:, 0, 0] = v[:, 1, 0] = self.x0
        v[:, 2, 0] = v[:, 3, 0] = self.x0 + self.width
        v[:, 0, 1] = v[:, 3, 1] = self.bottom
        v[:, 1, 1] = v[:, 2, 1] = self.bottom + heights
        return v

    def update(self, heights: np.ndarray, face: np.ndarray, edge: np.ndarray | None = None) -> None:
        self.paths.write(self._verts(heights))
        self.coll.set_facecolor(face)
        if edge is not None:
            self.coll.set_edgecolor(edge)


class _TicksOncePerDraw:
    """Computes each axis's ticks once per chart.

    Matplotlib asks an axis for its ticks (locator, formatter, every tick moved and relabelled)
    three times per draw: to draw them, to place the axis label beside the tick labels, and for
    the spine's extent. The limits are all set before the draw and nothing changes them during
    it, so the second and third answers equal the first.
    """

    def __init__(self, axes: list) -> None:
        self.ticks: dict[int, list] = {}
        for ax in axes:
            for axis in (ax.xaxis, ax.yaxis):
                axis._update_ticks = self._wrap(axis, axis._update_ticks)

    def _wrap(self, axis, original):
        key = id(axis)

        def update_ticks() -> list:
            hit = self.ticks.get(key)
            if hit is None:
                hit = self.ticks[key] = original()
            return hit

        return update_ticks

    def new_chart(self) -> None:
        self.ticks.clear()


class _GridLines:
    """An axis's gridlines as one LineCollection instead of one Line2D per tick.

    Each gridline is a 2-point dashed line drawn on its own (~0.3 ms of Python apiece, 60 on a
    full chart). One collection with the same transform, colour, width, dashes, cap style, clip
    box and z-order puts down the same pixels; it draws just before the axis (same z-order,
    added earlier), where only tick labels follow, and those sit outside the clip box.
    """

    def __init__(self, ax, axis) -> None:
        g = axis.get_major_ticks()[0].gridline
        self.axis = axis
        self.vertical = axis is ax.xaxis
        self.coll = LineCollection(
            [], colors=[g.get_color()], linewidths=[g.get_linewidth()], linestyles=[g.get_linestyle()],
            antialiaseds=[g.get_antialiased()], capstyle=g.get_dash_capstyle(), alpha=g.get_alpha(),
            zorder=axis.get_zorder(), transform=g.get_transform(),
        )
        ax.add_collection(self.coll, autolim=False)
        self.coll.set_clip_path(None)  # a gridline clips to the axes box, not the axes patch
        self.coll.set_clip_box(g.get_clip_box())
        axis.grid(False, which="major")

    def update(self) -> None:
        """Call after every limit is set: a line at each major tick inside the view, as the
        axis itself picks the ticks it draws."""
        locs = np.asarray(self.axis.get_majorticklocs(), dtype=float)
        scale = self.axis.get_transform()
        lo, hi = sorted(scale.transform(np.asarray(self.axis.get_view_interval(), dtype=float)))
        slack = (hi - lo) * VIEW_RTOL
        at = scale.transform(locs)
        locs = locs[(at >= lo - slack) & (at <= hi + slack)]
        segs = np.zeros((len(locs), 2, 2))
        along, across = (0, 1) if self.vertical else (1, 0)
        segs[:, :, along] = locs[:, None]
        segs[:, 1, across] = 1.0
        self.coll.set_segments(segs)


def _settle_twin_positions(fig) -> None:
    """Stop each panel's position from flip-flopping by a rounding error on every draw.

    mplfinance gives every panel an invisible twin whose position a locator derives from the
    panel's; the derived bounds differ from the panel's own in the last bit, and as each of the
    pair applies its position to both, every draw moves both and invalidates every transform
    hanging off them (~6 ms). Fixing both at the derived bounds, which is where a fresh figure
    draws the panel, ends the churn and keeps the picture.
    """
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        locator = ax.get_axes_locator()
        if locator is None:
            continue
        settled = locator(ax, renderer).frozen()
        ax.set_axes_locator(None)
        ax._set_position(settled, which="both")  # sets the whole twin group, as apply_aspect does


def _freeze_layout(legend) -> None:
    """A legend's entries never change once built: pack its boxes once, not four times a draw.

    Each packer's child offsets depend only on its children's sizes (fixed text, fixed handles,
    fixed dpi); where the legend sits is still computed on every draw.
    """
    boxes = [legend._legend_box]
    while boxes:
        box = boxes.pop()
        boxes.extend(box.get_children())
        if hasattr(box, "_get_bbox_and_child_offsets") and hasattr(box, "get_visible_children"):
            box._get_bbox_and_child_offsets = _once(box._get_bbox_and_child_offsets)


def _once(fn):
    memo: dict = {}

    def call(renderer):
        key = renderer.dpi
        if key not in memo:
            memo[key] = fn(renderer)
        return memo[key]

    return call


def _pair(colors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(up, down) RGBA rows from an artist's colour array (one row when both are equal)."""
    return colors[0], colors[min(1, len(colors) - 1)]


class _Prepared:
    def __init__(self, preset: ChartPreset, n: int) -> None:
        self.preset = preset
        self.n = n
        self.h: Handles = build_figure(template_window(n), preset)
        h = self.h
        # The legend lists only the patterns a window holds: one prepared legend per set of
        # patterns (at most 8), swapped in whole, as each is what the plain path would build.
        self.legends = {(): h.legend}
        self.patterns: tuple[str, ...] = ()
        if h.legend is not None:
            _freeze_layout(h.legend)
        self.ticks = _TicksOncePerDraw([ax for ax in h.fig.axes if ax.get_visible()])
        _settle_twin_positions(h.fig)
        self.grids = [
            _GridLines(ax, axis)
            for ax in h.fig.axes
            if ax.get_visible() and ax.axison
            for axis in (ax.xaxis, ax.yaxis)
            if axis.get_major_ticks() and axis.get_major_ticks()[0].gridline.get_visible()
        ]
        self.x = np.arange(n, dtype=np.float64)
        verts = h.bodies.get_paths()[0].vertices
        self.half_width = float(0.0 - verts[0, 0])
        self.body_face = _pair(h.bodies.get_facecolor())
        self.body_edge = _pair(h.bodies.get_edgecolor())
        self.wick = _pair(h.wicks.get_colors())
        self.body_paths = _PathsInPlace(h.bodies, n, 4, closed=True)
        self.wick_paths = _PathsInPlace(h.wicks, 2 * n, 2, closed=False)
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
        self.ticks.new_chart()
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
        self.body_paths.write(verts)
        h.bodies.set_facecolor(np.where(up_col, *self.body_face))
        h.bodies.set_edgecolor(np.where(up_col, *self.body_edge))
        segs = np.empty((2 * n, 2, 2))
        segs[:, :, 0] = np.concatenate([x, x])[:, None]
        segs[:n, 0, 1] = w.low
        segs[:n, 1, 1] = np.minimum(w.open, w.close)
        segs[n:, 0, 1] = w.high
        segs[n:, 1, 1] = np.maximum(w.open, w.close)
        self.wick_paths.write(segs)
        wick = np.where(up_col, *self.wick)
        h.wicks.set_color(np.concatenate([wick, wick]))

        nan = np.full(n, np.nan)
        for line, name in zip(h.overlays, p.overlays):
            line.set_ydata(w.indicators.get(name, nan))
        for col, ys in zip(h.marks, (marks.bull_hammer, marks.bull_engulfing, marks.bear_engulfing)):
            col.set_offsets(np.ma.masked_invalid(np.column_stack([x, ys])))
        if p.axis_text and marks.names != self.patterns:
            legend = self.legends.get(marks.names)
            if legend is None:
                legend = self.legends[marks.names] = chart_legend(h.price_ax, h.overlays, p, marks.names)
                _freeze_layout(legend)
            h.price_ax.legend_ = legend
            self.patterns = marks.names
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
        for grid in self.grids:
            grid.update()

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
