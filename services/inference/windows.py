"""Per (symbol, interval): the last ``capacity`` feature vectors and closes, in open_time order.

Rows are stored in the columns of the stream's feature set (as ``libs.indicators`` defines
it), so every model reading that stream takes its own columns, in its own order, by index.
A model's window is refused with a reason (never a silently wrong input) when the stream's
feature set does not provide the model's features, when fewer than ``lookback`` candles
have been seen, or when a candle in the window was not warm yet.

Pure domain: no bus. Idempotent on (symbol, interval, open_time): a repeated or older candle
is refused, so at-least-once delivery never shifts a window.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Iterable

import numpy as np

from libs.common.klines import interval_ms
from libs.indicators.feature_sets import UnknownFeatureSet, get_feature_set

Key = tuple[str, str]

# Why a model got no window for a candle (metric label values, bounded).
NOT_WARM = "not_warm"
TOO_FEW_CANDLES = "too_few_candles"
MISMATCH = "feature_set_mismatch"
GAP = "gap"  # a candle is missing inside the window: the trainer drops such windows too


class _Ring:
    __slots__ = ("feature_set", "columns", "rows", "closes", "open_times", "n", "head")

    def __init__(self, feature_set: str, columns: tuple[str, ...], capacity: int) -> None:
        self.feature_set = feature_set
        self.columns = columns
        self.rows = np.full((capacity, len(columns)), np.nan)
        self.closes = np.full(capacity, np.nan)
        self.open_times = np.zeros(capacity, dtype=np.int64)
        self.n = 0  # rows held (<= capacity)
        self.head = 0  # next slot to write

    @property
    def capacity(self) -> int:
        return len(self.closes)

    def push(self, open_time: int, close: float, row: np.ndarray) -> None:
        self.rows[self.head] = row
        self.closes[self.head] = close
        self.open_times[self.head] = open_time
        self.head = (self.head + 1) % self.capacity
        self.n = min(self.n + 1, self.capacity)

    def last(self, k: int) -> np.ndarray:
        """Slot indices of the last ``k`` rows, oldest first."""
        return (self.head - k + np.arange(k)) % self.capacity


@dataclass(frozen=True)
class Request:
    """A column selection: which stream feature set a model reads, and the columns it takes."""

    feature_set: str  # the model's set; "" = close only
    features: tuple[str, ...]
    lookback: int


class Windows:
    def __init__(self, capacity: int = 1, allow_superset: bool = True) -> None:
        self.capacity = max(1, capacity)
        # Features of one name come from the one kernel library whichever set asked for them, so
        # a stream publishing a larger set (all-v1) holds a bilstm-13-v1 model's exact inputs.
        self.allow_superset = allow_superset
        self._rings: dict[Key, _Ring] = {}
        self._columns: dict[str, tuple[str, ...] | None] = {}
        self._getters: dict[str, Any] = {}  # feature set -> itemgetter of its columns
        self._index: dict[tuple[str, tuple[str, ...]], np.ndarray | None] = {}

    def keys(self) -> list[Key]:
        return list(self._rings)

    def last_open_time(self, key: Key) -> int | None:
        ring = self._rings.get(key)
        if ring is None or ring.n == 0:
            return None
        return int(ring.open_times[(ring.head - 1) % ring.capacity])

    def held(self, key: Key) -> int:
        """Rows the stream holds now (0 for a stream not seen)."""
        ring = self._rings.get(key)
        return ring.n if ring is not None else 0

    def drop(self, key: Key) -> None:
        self._rings.pop(key, None)

    def feature_set(self, key: Key) -> str | None:
        ring = self._rings.get(key)
        return ring.feature_set if ring else None

    def _set_columns(self, feature_set: str) -> tuple[str, ...] | None:
        if feature_set not in self._columns:
            try:
                self._columns[feature_set] = get_feature_set(feature_set).features
            except UnknownFeatureSet:
                self._columns[feature_set] = None
        return self._columns[feature_set]

    def push(
        self, symbol: str, interval: str, open_time: int, close: float, feature_set: str, values: dict[str, float]
    ) -> bool:
        """Add a closed candle's features; False (and nothing changes) when it is not newer than the
        last one of its stream."""
        key = (symbol, interval)
        ring = self._rings.get(key)
        if ring is not None and ring.n and open_time <= ring.open_times[(ring.head - 1) % ring.capacity]:
            return False
        columns = self._set_columns(feature_set) or ()
        if ring is None or ring.feature_set != feature_set:
            # A stream that switches feature sets (features redeployed with another set) starts over:
            # rows of two sets are not one window.
            ring = self._rings[key] = _Ring(feature_set, columns, self.capacity)
        ring.push(open_time, close, self._row(feature_set, columns, values))
        return True

    def _row(self, feature_set: str, columns: tuple[str, ...], values: dict[str, float]) -> Any:
        """The values in column order, NaN where one is missing (a stream not yet warm). The usual
        case, every column present, is one C call: this runs once per stream per candle."""
        getter = self._getters.get(feature_set)
        if getter is None:
            getter = self._getters[feature_set] = itemgetter(*columns) if len(columns) > 1 else None
        if getter is not None and len(values) >= len(columns):
            try:
                return getter(values)
            except KeyError:
                pass
        return [values.get(c, np.nan) for c in columns]

    def compatible(self, stream_set: str, req: Request) -> bool:
        return self._column_index(stream_set, req) is not None

    def _column_index(self, stream_set: str, req: Request) -> np.ndarray | None:
        ck = (stream_set, req.features)
        if ck not in self._index:
            columns = self._set_columns(stream_set)
            ok = columns is not None and (stream_set == req.feature_set or self.allow_superset)
            if ok and all(f in columns for f in req.features):
                self._index[ck] = np.asarray([columns.index(f) for f in req.features], dtype=np.intp)
            else:
                self._index[ck] = None
        return self._index[ck]

    def window(self, key: Key, req: Request) -> tuple[np.ndarray | None, float, str]:
        """``(window[lookback, features], last_close, "")`` or ``(None, last_close, reason)``."""
        ring = self._rings[key]
        last_close = float(ring.closes[(ring.head - 1) % ring.capacity])
        if req.lookback > ring.n:
            return None, last_close, TOO_FEW_CANDLES
        slots = ring.last(req.lookback)
        if req.lookback > 1 and ring.open_times[slots[-1]] - ring.open_times[slots[0]] != (req.lookback - 1) * interval_ms(key[1]):
            return None, last_close, GAP
        if not req.feature_set:  # reads the close only
            return ring.closes[slots][:, None].copy(), last_close, ""
        idx = self._column_index(ring.feature_set, req)
        if idx is None:
            return None, last_close, MISMATCH
        win = ring.rows[np.ix_(slots, idx)]
        if np.isnan(win).any():
            return None, last_close, NOT_WARM
        return win, last_close, ""

    def grow(self, capacity: int) -> bool:
        """Make room for ``capacity`` rows per stream (kept rows stay). True when it grew: the
        caller then refills older rows from history (``refill``)."""
        if capacity <= self.capacity:
            return False
        self.capacity = capacity
        for key, old in list(self._rings.items()):
            ring = _Ring(old.feature_set, old.columns, capacity)
            for s in old.last(old.n):
                ring.push(int(old.open_times[s]), float(old.closes[s]), old.rows[s])
            self._rings[key] = ring
        return True

    def rows(self, key: Key) -> Iterable[tuple[int, float, str, np.ndarray]]:
        ring = self._rings[key]
        for s in ring.last(ring.n):
            yield int(ring.open_times[s]), float(ring.closes[s]), ring.feature_set, ring.rows[s]

    def refill(self, key: Key, history: list[tuple[int, float, str, dict[str, float]]]) -> None:
        """Put older candles (oldest first) in front of what the stream holds now."""
        held = list(self.rows(key)) if key in self._rings else []
        first_held = held[0][0] if held else None
        self._rings.pop(key, None)
        for open_time, close, fs, values in history:
            if first_held is None or open_time < first_held:
                self.push(key[0], key[1], open_time, close, fs, values)
        for open_time, close, fs, row in held:
            columns = self._set_columns(fs) or ()
            self.push(key[0], key[1], open_time, close, fs, dict(zip(columns, row.tolist())))
