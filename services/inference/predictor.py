"""Turns features events into forecasts: per-stream close windows + a model runner.

Pure domain: no bus. Idempotent on (symbol, interval, open_time): a repeated
or older candle yields nothing, so at-least-once delivery never doubles a
prediction.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from libs.common.klines import interval_ms
from services.inference.model_runner import OnnxRunner


@dataclass(frozen=True)
class Forecast:
    symbol: str
    interval: str
    open_time: int
    target_open_time: int
    last_close: float
    predicted_close: float


class Predictor:
    def __init__(self, runner: OnnxRunner) -> None:
        self.runner = runner
        self.window = runner.model.window
        self._closes: dict[tuple[str, str], deque[float]] = {}
        self._last_open: dict[tuple[str, str], int] = {}

    def accept(self, symbol: str, interval: str, open_time: int, close: float) -> bool:
        """Add a closed candle; False when it is a duplicate or older than one already seen."""
        key = (symbol, interval)
        if open_time <= self._last_open.get(key, -1):
            return False
        self._last_open[key] = open_time
        self._closes.setdefault(key, deque(maxlen=self.window)).append(close)
        return True

    def forecast(self, symbol: str, interval: str, open_time: int) -> Forecast | None:
        """The forecast for the candle after ``open_time``, once the window is full."""
        closes = self._closes.get((symbol, interval))
        if closes is None or len(closes) < self.window:
            return None
        (pred,) = self.runner.predict(np.asarray([closes], dtype=np.float64))
        return Forecast(
            symbol=symbol,
            interval=interval,
            open_time=open_time,
            target_open_time=open_time + interval_ms(interval),
            last_close=closes[-1],
            predicted_close=float(pred),
        )
