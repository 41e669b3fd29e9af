"""The direct path for text-free charts (the classifier's 224 px dataset images): Agg called
straight from numpy arrays, no figure, no artists.

A ``classifier224`` image is a white canvas, candle bodies, wicks, the two overlay lines and the
volume bars: six Agg calls. ``FastRenderer`` still walks matplotlib's artist tree to make them
(~3 ms a chart: limits, transforms, colour and path bookkeeping, figure and axes draw code); the
rasterising itself is a few hundred microseconds at 224 px. Here the prepared figure is drawn
once while every call that reaches the Agg renderer is recorded (graphics context, transform,
paths, colours) together with the artist that made it. Each chart then replays the recorded
calls on a bare ``RendererAgg``, with only what depends on the data replaced, computed with
numpy over all candles at once: the vertices of bodies, wicks and bars, the up/down colour rows,
the overlay line paths and the two panels' data-to-pixel transforms (from the same ``scales``
limits, through the axes' own transform objects, so the matrices are the very ones a draw uses).

Same rasteriser, same inputs: the pixels equal ``FastRenderer``'s and plain ``mplfinance``'s
exactly (``tests/libs/charting/test_direct.py`` checks every window of the shipped klines,
``np.array_equal``), and the PNG bytes too, as the encoder is shared. A rasteriser rewritten in
numpy could not promise that: matching Agg's anti-aliasing (its stroker, round joins and 1/256-px
cell coverage) is a port of Agg, and anything less moves edge pixels of every line the
classifier was trained on.

Only presets without text, MACD, RSI or pattern markers take this path (``supports``); a figure
that makes a call from an artist not listed here is refused when prepared, and callers
(``pool.renderer_for``) use ``FastRenderer`` instead.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from matplotlib.backends.backend_agg import RendererAgg
from matplotlib.path import Path

from libs.charting.fast import MAX_PREPARED, _Prepared
from libs.charting.png import encode_png
from libs.charting.presets import ChartPreset
from libs.charting.scales import limits, pattern_marks
from libs.charting.window import ChartWindow, check_window

# Renderer entry points an artist may reach; a recorded call to any but the first two is refused.
_DRAW_METHODS = ("draw_path", "draw_path_collection", "draw_markers", "draw_image", "draw_text",
                 "draw_mathtext", "draw_tex", "draw_gouraud_triangles", "draw_quad_mesh")


class UnsupportedChart(ValueError):
    """The preset draws something the direct path does not replay (text, panels, markers)."""


def supports(preset: ChartPreset) -> bool:
    return not (preset.axis_text or preset.macd or preset.rsi or preset.patterns)


@dataclass
class _Call:
    method: str
    owner: str  # which artist made it: figure, bodies, wicks, overlay<i>, volume
    gc: Any
    args: tuple
    kwargs: dict


def _record(prep: _Prepared) -> list[_Call]:
    """Draw the prepared figure once, keeping every renderer call and the artist that made it."""
    h = prep.h
    owners: dict[int, str] = {id(h.fig.patch): "figure", id(h.bodies): "bodies", id(h.wicks): "wicks"}
    owners.update({id(line): f"overlay{i}" for i, line in enumerate(h.overlays)})
    if h.volume_ax is not None:
        owners[id(prep.volume.coll)] = "volume"
    artists = [h.fig.patch, h.bodies, h.wicks, *h.overlays] + ([prep.volume.coll] if h.volume_ax is not None else [])
    current = ["unknown"]
    calls: list[_Call] = []

    def owned_draw(artist, original: Callable) -> Callable:
        def draw(renderer, *a, **k):
            before, current[0] = current[0], owners[id(artist)]
            try:
                return original(renderer, *a, **k)
            finally:
                current[0] = before

        return draw

    renderer = h.fig.canvas.get_renderer()
    originals = {name: getattr(renderer, name) for name in _DRAW_METHODS if hasattr(renderer, name)}
    own = {name for name in originals if name in vars(renderer)}  # Agg binds some per instance

    def recording(name: str, original: Callable) -> Callable:
        def call(gc, *a, **k):
            calls.append(_Call(name, current[0], copy.copy(gc), a, dict(k)))
            return original(gc, *a, **k)

        return call

    for artist in artists:
        artist.draw = owned_draw(artist, type(artist).draw.__get__(artist))
    for name, original in originals.items():
        setattr(renderer, name, recording(name, original))
    try:
        h.fig.canvas.draw()
    finally:
        for artist in artists:
            del artist.draw
        for name, original in originals.items():
            if name in own:
                setattr(renderer, name, original)
            else:
                delattr(renderer, name)
    return calls


class _Plan:
    """One window length: the recorded calls, and per call how the data replaces its arguments."""

    def __init__(self, preset: ChartPreset, n: int) -> None:
        self.preset = preset
        self.n = n
        prep = _Prepared(preset, n)
        self.prep = prep  # kept: its axes turn limits into transforms
        h = prep.h
        calls = _record(prep)
        self.steps: list[Callable[[dict], None]] = []
        width, height = h.fig.canvas.get_width_height()
        self.renderer = RendererAgg(width, height, h.fig.dpi)
        r = self.renderer
        self.x = np.arange(n, dtype=np.float64)
        self.half_width = prep.half_width
        # paths built once, as _PathsInPlace builds them, vertices rewritten per chart
        self.body_v = np.zeros((n, 5, 2))
        closed = Path(self.body_v[0], closed=True).codes
        self.body_paths = [Path(v, closed) for v in self.body_v]
        self.wick_v = np.zeros((2 * n, 2, 2))
        self.wick_paths = [Path(v) for v in self.wick_v]
        self.overlay_x = [np.asarray(line.get_xdata(), dtype=float) for line in h.overlays]
        if h.volume_ax is not None:
            self.vol_v = np.zeros((n, 5, 2))
            self.vol_paths = [Path(v, closed) for v in self.vol_v]
            self.vol_x0, self.vol_width, self.vol_bottom = prep.volume.x0, prep.volume.width, prep.volume.bottom
        for c in calls:
            if c.method == "draw_path_collection" and len(c.args[1]) == 0:
                continue  # matplotlib's probe for the hatchcolors keyword draws nothing
            self.steps.append(self._step(c, r, h, prep))

    def _pair(self, colors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        colors = np.asarray(colors)
        return colors[0], colors[min(1, len(colors) - 1)]

    def _step(self, c: _Call, r: RendererAgg, h, prep: _Prepared) -> Callable[[dict], None]:
        if c.owner == "figure" and c.method == "draw_path":
            return lambda d: r.draw_path(c.gc, *c.args, **c.kwargs)
        if c.method == "draw_path_collection" and c.owner in ("bodies", "wicks", "volume"):
            (master, paths, transforms, offsets, offset_trf, face, edge, lw, ls, aa, urls, pos) = c.args
            # one colour row per candle (a wick collection has two paths per candle; Agg cycles the rows)
            if len(transforms) or c.kwargs.keys() - {"hatchcolors"} or {len(face), len(edge)} - {0, self.n}:
                raise UnsupportedChart(f"{self.preset.name}: {c.owner} drawn differently than recorded")
            face_pair = self._pair(face) if len(face) else None
            edge_pair = self._pair(edge)
            hatch = "hatchcolors" in c.kwargs
            hatch_is_edge = hatch and np.array_equal(np.asarray(c.kwargs["hatchcolors"]), np.asarray(edge))
            if hatch and not hatch_is_edge:
                raise UnsupportedChart(f"{self.preset.name}: {c.owner} hatch colours differ from its edges")
            key = {"bodies": "price", "wicks": "price", "volume": "volume"}[c.owner]
            paths_now = {"bodies": self.body_paths, "wicks": self.wick_paths,
                         "volume": getattr(self, "vol_paths", None)}[c.owner]

            def draw(d: dict) -> None:
                up = d["rows"]
                fc = np.where(up, *face_pair) if face_pair is not None else face
                ec = np.where(up, *edge_pair)
                kw = {"hatchcolors": ec} if hatch else {}
                r.draw_path_collection(c.gc, d[key], paths_now, transforms, offsets, offset_trf, fc, ec, lw, ls, aa,
                                       urls, pos, **kw)

            return draw
        if c.method == "draw_path" and c.owner.startswith("overlay"):
            i = int(c.owner[len("overlay"):])
            path0 = c.args[0]
            if len(c.args) > 2 or c.kwargs or path0.codes is not None:
                raise UnsupportedChart(f"{self.preset.name}: overlay line drawn differently than recorded")
            name = self.preset.overlays[i]
            x = self.overlay_x[i]
            steps = path0._interpolation_steps

            def draw_line(d: dict) -> None:
                w = d["w"]
                y = w.indicators.get(name)
                if y is None:
                    y = np.full(self.n, np.nan)
                path = Path(np.column_stack([x, y]).astype(float), _interpolation_steps=steps)
                r.draw_path(c.gc, path, d["line_price"])

            return draw_line
        raise UnsupportedChart(f"{self.preset.name}: the figure makes a {c.method} call from {c.owner}")

    def _affine(self, ax, lo: float, hi: float, line: bool):
        ax.viewLim.intervaly = (lo, hi)
        return ax.transData.get_affine().frozen() if line else ax.transData.frozen()

    def pixels(self, w: ChartWindow) -> np.ndarray:
        """Draw ``w`` (already checked, ``n`` candles); returns the renderer's RGBA buffer (a view)."""
        h, n, x, dw = self.prep.h, self.n, self.x, self.half_width
        lim = limits(w, self.preset, pattern_marks(w, self.preset))
        up = w.open < w.close  # mplfinance: up only when strictly above the open
        v = self.body_v
        v[:, 0, 0] = v[:, 1, 0] = v[:, 4, 0] = x - dw
        v[:, 2, 0] = v[:, 3, 0] = x + dw
        v[:, 0, 1] = v[:, 3, 1] = v[:, 4, 1] = w.open
        v[:, 1, 1] = v[:, 2, 1] = w.close
        s = self.wick_v
        s[:n, :, 0] = s[n:, :, 0] = x[:, None]
        s[:n, 0, 1] = w.low
        s[:n, 1, 1] = np.minimum(w.open, w.close)
        s[n:, 0, 1] = w.high
        s[n:, 1, 1] = np.maximum(w.open, w.close)
        d = {"w": w, "rows": up[:, None]}
        d["price"] = self._affine(h.price_ax, *lim.price, line=False)
        d["line_price"] = h.price_ax.transData.get_affine().frozen()
        if h.volume_ax is not None:
            b = self.vol_v
            b[:, 0, 0] = b[:, 1, 0] = b[:, 4, 0] = self.vol_x0
            b[:, 2, 0] = b[:, 3, 0] = self.vol_x0 + self.vol_width
            b[:, 0, 1] = b[:, 3, 1] = b[:, 4, 1] = self.vol_bottom
            b[:, 1, 1] = b[:, 2, 1] = self.vol_bottom + w.volume
            d["volume"] = self._affine(h.volume_ax, *lim.volume, line=False)
        self.renderer.clear()
        for step in self.steps:
            step(d)
        return np.asarray(self.renderer.buffer_rgba())

    def close(self) -> None:
        self.prep.close()


class DirectRenderer:
    """Renders charts of one text-free preset by replaying Agg calls. Not thread-safe: one per
    worker process. ``UnsupportedChart`` for a preset it cannot draw."""

    def __init__(self, preset: ChartPreset) -> None:
        if not supports(preset):
            raise UnsupportedChart(f"{preset.name}: the direct path draws only text-free candle/volume/overlay charts")
        self.preset = preset
        self._plans: dict[int, _Plan] = {}

    def _plan(self, n: int) -> _Plan:
        plan = self._plans.get(n)
        if plan is None:
            if len(self._plans) >= MAX_PREPARED:
                self._plans.pop(next(iter(self._plans))).close()
            plan = self._plans[n] = _Plan(self.preset, n)
        return plan

    def pixels(self, w: ChartWindow) -> np.ndarray:
        """(height, width, 3) uint8, a copy."""
        w = check_window(w, self.preset.window)
        return self._plan(len(w)).pixels(w)[:, :, :3].copy()

    def render(self, w: ChartWindow) -> bytes:
        w = check_window(w, self.preset.window)
        return encode_png(self._plan(len(w)).pixels(w))

    def close(self) -> None:
        for plan in self._plans.values():
            plan.close()
        self._plans.clear()
