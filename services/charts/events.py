"""The charts.v1 event of a rendered window."""

from __future__ import annotations

from libs.common.contracts import ChartEvent
from libs.charting.presets import ENGULFING, HAMMER, ChartPreset
from libs.charting.scales import pattern_marks
from libs.charting.window import ChartWindow


def chart_event(w: ChartWindow, preset: ChartPreset, uri: str, rendered_at: int) -> ChartEvent:
    shown = tuple(n for n in preset.indicator_names if n not in (HAMMER, ENGULFING))
    return ChartEvent(
        symbol=w.symbol,
        interval=w.interval,
        open_time=w.last_open_time,
        first_open_time=w.first_open_time,
        uri=uri,
        window=len(w),
        preset=preset.name,
        width=preset.width_px,
        height=preset.height_px,
        indicators=w.last_values(shown),
        patterns=list(pattern_marks(w, preset).names),
        rendered_at=rendered_at,
    )
