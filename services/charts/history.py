"""The recent candles of each (symbol, interval), enough for a window plus indicator warm-up."""

from __future__ import annotations

from collections import deque
from typing import Iterable

import numpy as np

from libs.common.klines import Kline
from libs.charting.indicators import window_with_indicators
from libs.charting.presets import ChartPreset
from libs.charting.window import ChartInputError, ChartWindow


class CandleHistory:
    """Keeps the last ``capacity`` closed candles per key, idempotent on open_time (a redelivered
    or older candle changes nothing)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._rows: dict[tuple[str, str], deque[tuple[int, float, float, float, float, float]]] = {}

    def add(self, k: Kline) -> bool:
        rows = self._rows.setdefault((k.symbol, k.interval), deque(maxlen=self.capacity))
        if rows and k.open_time <= rows[-1][0]:
            return False
        rows.append((k.open_time, k.open, k.high, k.low, k.close, k.volume))
        return True

    def merge(self, older: Iterable[Kline]) -> int:
        """Add candles from before the ones held (a backfill), keeping the newest ``capacity``;
        a candle already held changes nothing. Returns how many were added."""
        older = list(older)
        if not older:
            return 0
        key = (older[0].symbol, older[0].interval)
        rows = {r[0]: r for r in self._rows.get(key, ())}
        held = len(rows)
        for k in older:
            rows.setdefault(k.open_time, (k.open_time, k.open, k.high, k.low, k.close, k.volume))
        self._rows[key] = deque((rows[t] for t in sorted(rows)), maxlen=self.capacity)
        return len(rows) - held

    def __len__(self) -> int:
        return len(self._rows)

    def count(self, symbol: str, interval: str) -> int:
        return len(self._rows.get((symbol, interval), ()))

    def window(self, symbol: str, interval: str, preset: ChartPreset) -> ChartWindow:
        """Everything held for the key, with the preset's indicators (the renderer takes the tail)."""
        rows = self._rows.get((symbol, interval))
        if not rows:
            raise ChartInputError(f"{symbol} {interval}: no candles seen yet")
        a = np.array(rows, dtype=np.float64)
        return window_with_indicators(
            symbol, interval, a[:, 0].astype(np.int64), a[:, 1], a[:, 2], a[:, 3], a[:, 4], a[:, 5], preset
        )
