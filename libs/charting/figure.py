"""Build a chart with plain ``mplfinance.plot`` (the reference look) and save it as PNG.

This is the plain path: a new figure per chart. The fast path
(``libs.charting.fast``) builds one figure here and then only swaps data,
so everything about the look lives in this module.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from datetime import datetime, timezone

import matplotlib

matplotlib.use("Agg")  # no display in services or workers; must precede pyplot

import logging  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import mplfinance as mpf  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.collections import LineCollection, PathCollection, PolyCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.legend import Legend  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.text import Text  # noqa: E402
from matplotlib.ticker import FixedLocator, MaxNLocator  # noqa: E402

from libs.charting.png import encode_png  # noqa: E402
from libs.charting.presets import EMA, MACD, MACD_HIST, MACD_SIGNAL, RSI, SMA, ChartPreset  # noqa: E402
from libs.charting.scales import PATTERN_NAMES, Limits, PatternMarks, limits, pattern_marks  # noqa: E402
from libs.charting.window import ChartWindow  # noqa: E402

# mplfinance's binance style asks for font weights DejaVu lacks; matplotlib substitutes the nearest
# weight and logs a warning per text on every figure, which would flood the service log.
logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)

OVERLAY_COLORS = {SMA: "#1f77b4", EMA: "#ff7f0e"}
OVERLAY_LABELS = {SMA: "SMA 20", EMA: "EMA 20"}
MACD_COLOR, SIGNAL_COLOR = "#1f77b4", "#ff7f0e"
HIST_UP, HIST_DOWN = "#26a69a", "#ef5350"
RSI_COLOR, GUIDE_COLOR = "#7e57c2", "#888888"
RSI_GUIDES = (70.0, 30.0)  # overbought / oversold, Wilder's classic levels
BULL_MARK, BEAR_MARK = "#0b6e4f", "#b3001b"
# One glyph per pattern, as a trader's chart marks them: bullish below the candle in green,
# bearish above in red; the legend names each glyph. Sizes in points^2 (scatter), chosen so the
# three read as the same weight.
# Legend text: matplotlib's "small" under the binance style's 12 pt. Its one row is ~0.8 of the
# price panel's width on a chart this wide; narrower charts get proportionally smaller text so
# the row still ends inside the panel.
LEGEND_PT = 10.0
LEGEND_FULL_WIDTH_PX = 880
# Marker gaps are a share of the price range, so they shrink with the chart; glyphs below this
# height shrink with it (linearly) so a stacked pair still clears each other and the candle.
MARK_FULL_HEIGHT_PX = 700
DATE_LABEL_SPACING = 1.15  # room per date label, in label widths: the label and a gap
PATTERN_GLYPHS = {  # scales.PATTERN_NAMES -> (legend text, marker, colour, size)
    "hammer": ("Hammer", "^", BULL_MARK, 70.0),
    "bullish_engulfing": ("Bull engulfing", "D", BULL_MARK, 38.0),
    "bearish_engulfing": ("Bear engulfing", "v", BEAR_MARK, 70.0),
}


@dataclass
class Handles:
    """The artists of one chart that depend on the data, in a fixed order."""

    fig: Figure
    price_ax: object
    volume_ax: object | None
    macd_ax: object | None
    rsi_ax: object | None
    wicks: LineCollection
    bodies: PolyCollection
    overlays: list[Line2D]
    marks: list[PathCollection]  # in scales.PATTERN_NAMES order
    legend: Legend | None  # lines and the glyphs of the patterns this window holds
    volume_bars: list[Rectangle]
    macd_lines: list[Line2D]  # macd, signal
    macd_bars: list[Rectangle]
    rsi_line: Line2D | None
    title: Text | None
    formatter: object  # mplfinance's IntegerIndexDateTimeFormatter on the bottom axes


def title_text(w: ChartWindow) -> str:
    start = datetime.fromtimestamp(w.first_open_time / 1000, tz=timezone.utc)
    end = datetime.fromtimestamp(w.last_open_time / 1000, tz=timezone.utc)
    return f"{w.symbol} {w.interval}   {start:%Y-%m-%d %H:%M} → {end:%Y-%m-%d %H:%M} UTC"


def volume_label(exponent: int) -> str:
    return "Volume" if exponent == 0 else f"Volume  $10^{{{exponent}}}$"


def hist_colors(hist: np.ndarray) -> list[str]:
    return [HIST_UP if h >= 0 else HIST_DOWN for h in np.nan_to_num(hist, nan=0.0)]


def _frame(w: ChartWindow) -> pd.DataFrame:
    index = pd.DatetimeIndex(pd.to_datetime(w.open_time, unit="ms"), name="Date")
    return pd.DataFrame(
        {"Open": w.open, "High": w.high, "Low": w.low, "Close": w.close, "Volume": w.volume}, index=index
    )


def _nan(n: int) -> np.ndarray:
    return np.full(n, np.nan)


def _addplots(w: ChartWindow, p: ChartPreset, lim: Limits, marks: PatternMarks) -> list[dict]:
    n = len(w)
    aps = []
    for name in p.overlays:
        aps.append(
            mpf.make_addplot(
                w.indicators.get(name, _nan(n)), panel=0, color=OVERLAY_COLORS.get(name, "#555555"),
                width=1.4 if p.axis_text else 1.0, secondary_y=False,
            )
        )
    if p.patterns:
        for name, ys in zip(PATTERN_NAMES, (marks.bull_hammer, marks.bull_engulfing, marks.bear_engulfing)):
            _, marker, color, size = PATTERN_GLYPHS[name]
            aps.append(
                mpf.make_addplot(ys, panel=0, type="scatter", marker=marker, markersize=size * _mark_scale(p) ** 2,
                                 color=color, secondary_y=False)
            )
    panel = 2 if p.volume else 1
    if p.macd:
        hist = w.indicators.get(MACD_HIST, _nan(n))
        aps += [
            mpf.make_addplot(w.indicators.get(MACD, _nan(n)), panel=panel, color=MACD_COLOR, width=1.2,
                             secondary_y=False, ylabel="MACD" if p.axis_text else "", ylim=lim.macd),
            mpf.make_addplot(w.indicators.get(MACD_SIGNAL, _nan(n)), panel=panel, color=SIGNAL_COLOR, width=1.2,
                             secondary_y=False, ylim=lim.macd),
            mpf.make_addplot(np.nan_to_num(hist, nan=0.0), panel=panel, type="bar", width=0.7,
                             color=hist_colors(hist), alpha=0.6, secondary_y=False, ylim=lim.macd),
        ]
        panel += 1
    if p.rsi:
        aps += [
            mpf.make_addplot(w.indicators.get(RSI, _nan(n)), panel=panel, color=RSI_COLOR, width=1.2,
                             secondary_y=False, ylabel="RSI" if p.axis_text else "", ylim=lim.rsi),
        ]
        aps += [
            mpf.make_addplot(np.full(n, level), panel=panel, color=GUIDE_COLOR, width=0.9, linestyle="--",
                             secondary_y=False, ylim=lim.rsi)
            for level in RSI_GUIDES
        ]
    return aps


def _mark_scale(p: ChartPreset) -> float:
    return min(1.0, p.height_px / MARK_FULL_HEIGHT_PX)


def _panel_ratios(p: ChartPreset) -> tuple[float, ...]:
    ratios = [5.0]
    if p.volume:
        ratios.append(1.4 if (p.macd or p.rsi) else 1.5)
    if p.macd:
        ratios.append(1.6)
    if p.rsi:
        ratios.append(1.6)
    return tuple(ratios)


def build_figure(w: ChartWindow, p: ChartPreset) -> Handles:
    """Draw ``w`` with ``mplfinance.plot`` and return the data-bearing artists."""
    marks = pattern_marks(w, p)
    lim = limits(w, p, marks)
    kwargs: dict = dict(
        type="candle",
        style=p.style,
        volume=p.volume,
        addplot=_addplots(w, p, lim, marks),
        panel_ratios=_panel_ratios(p),
        figsize=(p.width_px / p.dpi, p.height_px / p.dpi),
        ylim=lim.price,
        datetime_format=p.datetime_format,
        xrotation=0,
        ylabel="Price" if p.axis_text else "",
        returnfig=True,
        warn_too_much_data=10**6,
    )
    if p.volume:
        kwargs.update(volume_panel=1, volume_ylim=lim.volume, volume_exponent=lim.volume_exponent,
                      ylabel_lower="Volume" if p.axis_text else "")
    if p.axis_text:
        kwargs.update(title=title_text(w), tight_layout=False,
                      scale_padding=dict(left=0.55, right=0.35, top=0.55, bottom=0.35))
    else:
        # A dataset image is all chart: no text, and the panels fill the square.
        kwargs.update(axisoff=True, tight_layout=True, scale_padding=dict(left=0.05, right=0.05, top=0.3, bottom=0.2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mplfinance's all-NaN warm-up warnings are expected
        fig, axlist = mpf.plot(_frame(w), **kwargs)
    fig.set_dpi(p.dpi)
    return _collect(fig, axlist, p, lim, marks)


def _collect(fig, axlist, p: ChartPreset, lim: Limits, marks: PatternMarks) -> Handles:
    primaries = axlist[0::2]  # mplfinance returns (primary, secondary) per panel
    price_ax = primaries[0]
    i = 1
    volume_ax = macd_ax = rsi_ax = None
    if p.volume:
        volume_ax, i = primaries[i], i + 1
        volume_ax.set_ylabel(volume_label(lim.volume_exponent) if p.axis_text else "")
    if p.macd:
        macd_ax, i = primaries[i], i + 1
    if p.rsi:
        rsi_ax, i = primaries[i], i + 1
    wicks, bodies = price_ax.collections[0], price_ax.collections[1]
    if not (isinstance(wicks, LineCollection) and isinstance(bodies, PolyCollection)):
        raise RuntimeError("mplfinance drew candles differently than this renderer expects")
    overlays = list(price_ax.lines[: len(p.overlays)])
    mark_cols = [c for c in price_ax.collections[2:] if isinstance(c, PathCollection)]
    if p.axis_text:
        _tidy_ticks(volume_ax, macd_ax, rsi_ax)
        _space_date_ticks(fig, primaries[-1], p)
    for ax in primaries:
        _drop_empty_tick_marks(ax)
    legend = chart_legend(price_ax, overlays, p, marks.names) if p.axis_text else None
    return Handles(
        fig=fig,
        price_ax=price_ax,
        volume_ax=volume_ax,
        macd_ax=macd_ax,
        rsi_ax=rsi_ax,
        wicks=wicks,
        bodies=bodies,
        overlays=overlays,
        marks=mark_cols,
        legend=legend,
        volume_bars=list(volume_ax.patches) if volume_ax is not None else [],
        macd_lines=list(macd_ax.lines[:2]) if macd_ax is not None else [],
        macd_bars=list(macd_ax.patches) if macd_ax is not None else [],
        rsi_line=rsi_ax.lines[0] if rsi_ax is not None else None,
        title=fig._suptitle if p.axis_text else None,
        formatter=primaries[-1].xaxis.get_major_formatter(),
    )


def _tidy_ticks(volume_ax, macd_ax, rsi_ax) -> None:
    # Stacked panels share edges: pruning the edge ticks keeps one panel's top label from
    # printing over its neighbour's bottom label.
    if volume_ax is not None:
        volume_ax.yaxis.set_major_locator(MaxNLocator(nbins=3, prune="both"))
    if macd_ax is not None:
        macd_ax.yaxis.set_major_locator(MaxNLocator(nbins=4, prune="both"))
    if rsi_ax is not None:
        rsi_ax.yaxis.set_major_locator(FixedLocator(RSI_GUIDES[::-1] + (50.0,)))


def _space_date_ticks(fig, bottom_ax, p: ChartPreset) -> None:
    """As many candle-index ticks as date labels fit side by side, at 1-2-2.5-5-10 steps.

    matplotlib's default spaces x ticks for labels three font-sizes wide; a "%m-%d %H:%M" label
    is about nine, so a 200-candle chart printed its dates into each other.
    """
    sample = bottom_ax.xaxis.get_major_ticks()[0].label1
    probe = Text(0, 0, "00-00 00:00" if p.datetime_format == "%m-%d %H:%M" else "0" * 14,
                 fontproperties=sample.get_fontproperties(), figure=fig)
    label_px = probe.get_window_extent(fig.canvas.get_renderer()).width
    axes_px = bottom_ax.get_position().width * p.width_px
    fit = int(axes_px // (label_px * DATE_LABEL_SPACING))
    # MaxNLocator picks the first nice step >= span / nbins, so labels stand at least label_px apart
    bottom_ax.xaxis.set_major_locator(MaxNLocator(nbins=max(1, fit), steps=[1, 2, 2.5, 5, 10], integer=True))


def _drop_empty_tick_marks(ax) -> None:
    # The binance style sets tick length 0: each tick mark is a visible marker of size 0 that
    # puts down no pixel but costs a line draw (a third of all artists drawn). Hiding them keeps
    # the picture and halves the tick work, in both paths.
    for axis in (ax.xaxis, ax.yaxis):
        ticks = axis.get_major_ticks() + axis.get_minor_ticks()
        if ticks and all(t.tick1line.get_markersize() == 0 and t.tick2line.get_markersize() == 0 for t in ticks):
            axis.set_tick_params(which="both", tick1On=False, tick2On=False)


def chart_legend(price_ax, overlays: list[Line2D], p: ChartPreset, patterns: tuple[str, ...]) -> Legend | None:
    """One row in the band above the candles: the overlay lines, then the glyph and name of
    each pattern the window holds (only those, so the legend never names what is not there)."""
    handles: list = list(overlays)
    texts = [OVERLAY_LABELS.get(n, n) for n in p.overlays][: len(overlays)]
    for name in patterns:
        text, marker, color, size = PATTERN_GLYPHS[name]
        handles.append(Line2D([], [], linestyle="none", marker=marker, color=color,
                              markersize=float(np.sqrt(size)) * _mark_scale(p)))
        texts.append(text)
    if not handles:
        return None
    return price_ax.legend(
        handles, texts, loc="upper left", ncol=len(handles), fontsize=LEGEND_PT * min(1.0, p.width_px / LEGEND_FULL_WIDTH_PX),
        framealpha=0.8,
        borderpad=0.3, handlelength=1.6, handletextpad=0.4, columnspacing=1.2, borderaxespad=0.3,
    )


def save_png(fig: Figure) -> bytes:
    """Draw ``fig`` at its own dpi (set from the preset) and encode it."""
    fig.canvas.draw()
    return encode_png(np.asarray(fig.canvas.buffer_rgba()))


def render_plain(w: ChartWindow, p: ChartPreset) -> bytes:
    """One chart, a fresh mplfinance figure: the reference the fast path is measured against."""
    h = build_figure(w, p)
    try:
        return save_png(h.fig)
    finally:
        plt.close(h.fig)
