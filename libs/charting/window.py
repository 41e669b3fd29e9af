"""The candles and indicator values one chart shows, checked before anything is drawn.

A ``ChartWindow`` is plain arrays (no pandas, no bus) so it crosses a process
boundary cheaply and both render paths read the very same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from libs.common.klines import INTERVAL_MS

OHLCV = ("open", "high", "low", "close", "volume")


class ChartInputError(ValueError):
    """The window cannot be charted; the message is one line fit for a dead letter."""


@dataclass(frozen=True)
class ChartWindow:
    symbol: str
    interval: str
    open_time: np.ndarray  # int64 ms since epoch, UTC, strictly increasing
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray
    # Indicator name -> array aligned with the candles; NaN where not warmed up.
    indicators: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.open_time)

    @property
    def first_open_time(self) -> int:
        return int(self.open_time[0])

    @property
    def last_open_time(self) -> int:
        return int(self.open_time[-1])

    def tail(self, n: int) -> "ChartWindow":
        """The last ``n`` candles (all of them when there are fewer)."""
        return self.slice(max(len(self) - n, 0), len(self))

    def slice(self, start: int, stop: int) -> "ChartWindow":
        s = slice(start, stop)
        return ChartWindow(
            symbol=self.symbol,
            interval=self.interval,
            open_time=self.open_time[s],
            open=self.open[s],
            high=self.high[s],
            low=self.low[s],
            close=self.close[s],
            volume=self.volume[s],
            indicators={k: v[s] for k, v in self.indicators.items()},
        )

    def last_values(self, names: tuple[str, ...] | None = None) -> dict[str, float]:
        """The last finite value of each indicator shown (what a chart event reports)."""
        out: dict[str, float] = {}
        for name, arr in self.indicators.items():
            if names is not None and name not in names:
                continue
            if len(arr) and np.isfinite(arr[-1]):
                out[name] = float(arr[-1])
        return out


def make_window(
    symbol: str,
    interval: str,
    open_time: np.ndarray,
    open: np.ndarray,
    high: np.ndarray,
    low: np.ndarray,
    close: np.ndarray,
    volume: np.ndarray,
    indicators: Mapping[str, np.ndarray] | None = None,
) -> ChartWindow:
    """Build a window, coercing dtypes; raises ``ChartInputError`` on mismatched lengths."""
    arrays = {
        "open": np.ascontiguousarray(open, dtype=np.float64),
        "high": np.ascontiguousarray(high, dtype=np.float64),
        "low": np.ascontiguousarray(low, dtype=np.float64),
        "close": np.ascontiguousarray(close, dtype=np.float64),
        "volume": np.ascontiguousarray(volume, dtype=np.float64),
    }
    times = np.ascontiguousarray(open_time, dtype=np.int64)
    n = len(times)
    for name, arr in arrays.items():
        if len(arr) != n:
            raise ChartInputError(f"{symbol} {interval}: {name} has {len(arr)} values for {n} candles")
    inds: dict[str, np.ndarray] = {}
    for name, arr in (indicators or {}).items():
        a = np.ascontiguousarray(arr, dtype=np.float64)
        if len(a) != n:
            raise ChartInputError(f"{symbol} {interval}: indicator {name} has {len(a)} values for {n} candles")
        inds[name] = a
    return ChartWindow(symbol, interval, times, indicators=inds, **arrays)


def check_window(w: ChartWindow, need: int) -> ChartWindow:
    """Return the last ``need`` candles of ``w`` if they can be charted, else raise ``ChartInputError``.

    Indicators may be NaN (warm-up); candles may not, because a candle with no
    price cannot be drawn truthfully and must not be papered over.
    """
    where = f"{w.symbol} {w.interval}"
    if w.interval not in INTERVAL_MS:
        raise ChartInputError(f"{where}: unknown interval {w.interval!r}")
    if len(w) < need:
        raise ChartInputError(f"{where}: need {need} candles for the window, have {len(w)}")
    w = w.tail(need)
    for name in OHLCV:
        arr = getattr(w, name)
        bad = ~np.isfinite(arr)
        if bad.any():
            at = int(w.open_time[int(np.argmax(bad))])
            raise ChartInputError(f"{where}: {name} is not a finite number at open_time={at}")
    if (w.volume < 0).any():
        raise ChartInputError(f"{where}: negative volume in the window")
    if (w.high < w.low).any():
        at = int(w.open_time[int(np.argmax(w.high < w.low))])
        raise ChartInputError(f"{where}: high < low at open_time={at}")
    if len(w) > 1 and (np.diff(w.open_time) <= 0).any():
        raise ChartInputError(f"{where}: open_time is not strictly increasing")
    return w
