"""Reuse rasterised glyphs across draws of a prepared figure.

On a reused chart figure, text is most of the draw time: matplotlib's Agg
renderer lays out every label and asks FreeType to rasterise every glyph anew
on each draw, though tick labels, titles and legends repeat the same few
characters. FreeType places a glyph at a 1/64-pixel position; moving it by
whole pixels moves the bitmap and changes nothing else, so a bitmap cached by
(font, size, glyph, angle, sub-pixel phase) and pasted at the new whole-pixel
offset puts down the very same pixels.

Text layout (``Text._get_layout``: line metrics, alignment offsets) is the
other repeated cost: tick labels, axis labels and legend entries are laid out
two to six times per draw (for the tick-label bboxes, the axis-label
position, the legend's packing, the draw), each time from scratch. The layout
is relative to the text's anchor and depends only on the properties keyed
below, so it is memoised for renderers that carry the glyph cache; any other
renderer (the plain path) runs matplotlib's own code.

This hooks private methods of matplotlib's Agg renderer and Text (pinned
matplotlib 3.11); ``install`` does nothing when they are missing, leaving the
renderer slower but correct. The fast-path tests compare against plain
mplfinance pixel for pixel, so a change in matplotlib cannot pass silently.
"""

from __future__ import annotations

import math
import types
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import RendererAgg, get_hinting_flag
from matplotlib.ft2font import RenderMode
from matplotlib.text import Text

MAX_GLYPHS = 50_000  # a few MB of small bitmaps; cleared when full
MAX_LAYOUTS = 20_000
SUBPIXEL = 0x40  # FreeType's 26.6 fixed point: 64 units per pixel


_layouts: dict[tuple, Any] = {}
_original_get_layout = getattr(Text, "_get_layout", None)


def _cached_get_layout(self: Text, renderer: Any) -> Any:
    if not getattr(renderer, "_klinebus_glyph_cache", False) or self.get_wrap() or self.get_usetex():
        return _original_get_layout(self, renderer)
    # Everything _get_layout reads: text, font, spacing, alignment, rotation, math parsing, dpi.
    key = (
        self.get_text(), hash(self._fontproperties), self._linespacing, self._get_multialignment(),
        self.get_rotation(), self._horizontalalignment, self._verticalalignment, self.get_rotation_mode(),
        self.get_parse_math(), self.get_figure(root=True).dpi,
    )
    hit = _layouts.get(key)
    if hit is None:
        if len(_layouts) >= MAX_LAYOUTS:
            _layouts.clear()
        hit = _layouts[key] = _original_get_layout(self, renderer)
    return hit


def install(renderer: RendererAgg) -> bool:
    if getattr(renderer, "_klinebus_glyph_cache", False):
        return True
    if not hasattr(renderer, "_draw_text_glyphs_and_boxes") or not hasattr(renderer, "_prepare_font"):
        return False
    if _original_get_layout is not None and Text._get_layout is _original_get_layout:
        Text._get_layout = _cached_get_layout
    glyphs: dict[tuple, tuple[np.ndarray, int, int]] = {}
    layouts: dict[tuple, list] = {}
    original_boxes = renderer._draw_text_glyphs_and_boxes

    def draw_glyphs(self: RendererAgg, gc: Any, x: float, y: float, angle: float, items: Any, boxes: Any) -> None:
        cos = math.cos(math.radians(angle))
        sin = math.sin(math.radians(angle))
        antialiased = gc.get_antialiased()
        height = self.height
        for font, size, glyph_index, slant, extend, dx, dy in items:
            tx = round(SUBPIXEL * (x + dx * cos - dy * sin))
            ty = round(SUBPIXEL * (height - y + dx * sin + dy * cos))
            key = (id(font), size, glyph_index, slant, extend, angle, tx & 63, ty & 63, antialiased)
            hit = glyphs.get(key)
            if hit is None:
                font.set_size(size, self.dpi)
                font._set_transform(
                    (0x10000 * np.array([[cos, -sin], [sin, cos]]) @ [[extend, extend * slant], [0, 1]])
                    .round()
                    .astype(int),
                    [tx, ty],
                )
                bitmap = font._render_glyph(
                    glyph_index, get_hinting_flag(), RenderMode.NORMAL if antialiased else RenderMode.MONO
                )
                buffer = np.array(bitmap.buffer, copy=True)
                if not antialiased:
                    buffer *= 0xFF
                if len(glyphs) >= MAX_GLYPHS:
                    glyphs.clear()
                hit = glyphs[key] = (buffer, bitmap.left - (tx >> 6), bitmap.top - (ty >> 6))
                keep_alive[id(font)] = font
            buffer, left, top = hit
            self._renderer.draw_text_image(
                buffer, left + (tx >> 6), int(height) - (top + (ty >> 6)) + buffer.shape[0], 0, gc
            )
        if boxes:
            original_boxes(gc, x, y, angle, (), boxes)

    def draw_text(self: RendererAgg, gc: Any, x: float, y: float, s: str, prop: Any, angle: float,
                  ismath: bool = False, mtext: Any = None) -> None:
        if ismath:
            return self.draw_mathtext(gc, x, y, s, prop, angle)
        features = mtext.get_fontfeatures() if mtext is not None else None
        language = mtext.get_language() if mtext is not None else None
        key = (s, hash(prop), features if features is None else tuple(features), language)
        items = layouts.get(key)
        if items is None:
            font = self._prepare_font(prop)
            size = prop.get_size_in_points()
            items = [
                (item.ft_object, size, item.glyph_index, 0, 1, item.x, item.y)
                for item in font._layout(s, flags=get_hinting_flag(), features=features, language=language)
            ]
            if len(layouts) >= MAX_LAYOUTS:
                layouts.clear()
            layouts[key] = items
        self._draw_text_glyphs_and_boxes(gc, x, y, angle, items, [])

    # id(font) is only a safe key while the font object lives: keep every keyed font alive.
    keep_alive: dict[int, Any] = {}
    renderer._draw_text_glyphs_and_boxes = types.MethodType(draw_glyphs, renderer)
    renderer.draw_text = types.MethodType(draw_text, renderer)
    renderer._klinebus_glyph_cache = True
    return True
