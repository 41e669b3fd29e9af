"""The chart renderer the dataset uses: the charts service's fast renderer, ``classifier224`` preset.

The trainer may not import ``services.charts`` (no service imports another service), so the
renderer is reached through ``libs.charting``, the lib that holds the charts service's rendering
code. ``make_renderer`` takes its three pieces explicitly, so a caller can build the very same
renderer from them (as the tests do).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from libs.common.errors import CliError
from libs.indicators.catalog import FEATURES

LOOKBACK = {f.name: f.lookback for f in FEATURES}


@dataclass(frozen=True)
class ChartRenderer:
    """Renders windows of one kline frame to PNG files with one preset, in parallel processes."""

    preset: Any  # a ChartPreset sized to the dataset's window (classifier224: 224 x 224)
    window_from_frame: Callable[..., Any]  # (frame, symbol, interval, preset) -> ChartWindow
    pool_factory: Callable[[int | None], Any]  # workers -> RenderPool (context manager)

    @property
    def window(self) -> int:
        return int(self.preset.window)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.preset.width_px), int(self.preset.height_px)

    @property
    def warmup(self) -> int:
        """Candles before a window's first one that its indicator lines need to be drawn warm."""
        return max((LOOKBACK.get(n, 0) for n in self.preset.indicator_names), default=0)

    def describe(self) -> dict:
        return {
            "preset": self.preset.name, "window": self.window, "width": self.size[0], "height": self.size[1],
            "indicators": list(self.preset.indicator_names), "volume": bool(self.preset.volume),
        }

    def render(self, frame, symbol: str, interval: str, jobs: Sequence[tuple[int, str]], workers: int | None) -> Iterator[str]:
        """``jobs``: (row of the window's last candle, PNG path); yields each path once written."""
        if not jobs:
            return
        full = self.window_from_frame(frame, symbol, interval, self.preset)
        work = [(full.slice(row - self.window + 1, row + 1), self.preset, path) for row, path in jobs]
        with self.pool_factory(workers) as pool:
            yield from pool.render_files(work)


def make_renderer(window: int, presets_module: Any, window_from_frame: Callable[..., Any], pool_factory: Callable) -> ChartRenderer:
    """The classifier renderer from the charting modules (``presets``, ``window_from_frame``, ``RenderPool``)."""
    preset = presets_module.get_preset("classifier224").sized(window=window)
    return ChartRenderer(preset=preset, window_from_frame=window_from_frame, pool_factory=pool_factory)


def default_renderer(window: int) -> ChartRenderer:
    try:
        from libs.charting import presets
        from libs.charting.indicators import window_from_frame
        from libs.charting.pool import RenderPool
    except ModuleNotFoundError as exc:
        raise CliError(
            f"chart rendering needs the package {exc.name!r}: pip install 'klinebus[trainer]'"
        ) from None
    return make_renderer(window, presets, window_from_frame, RenderPool)
