"""What counts as an impossible candle, and one-line errors for it.

The per-candle rule (``candle_problem``) is a numba function so the streaming
kernel applies exactly the same rule as batch validation.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from libs.common.klines import InvalidKline

OK = 0
NOT_FINITE = 1
NON_POSITIVE_PRICE = 2
HIGH_BELOW_LOW = 3
OUTSIDE_RANGE = 4
NEGATIVE_VOLUME = 5

PROBLEMS = {
    NOT_FINITE: "a price or the volume is NaN or infinite",
    NON_POSITIVE_PRICE: "a price is zero or negative",
    HIGH_BELOW_LOW: "high is below low",
    OUTSIDE_RANGE: "open or close lies outside [low, high]",
    NEGATIVE_VOLUME: "volume is negative",
}


class InvalidCandles(InvalidKline):
    """Input the indicators cannot be computed from. ``reason`` is one line; ``index`` the row."""

    def __init__(self, reason: str, index: int | None = None) -> None:
        super().__init__(reason)
        self.index = index


@njit(cache=True, inline="always", error_model="numpy")
def candle_problem(o, h, l, c, v):  # noqa: E741
    """0 when (o, h, l, c, v) can be a real candle, else one of the problem codes above."""
    if not (np.isfinite(o) and np.isfinite(h) and np.isfinite(l) and np.isfinite(c) and np.isfinite(v)):
        return NOT_FINITE
    if o <= 0.0 or h <= 0.0 or l <= 0.0 or c <= 0.0:
        return NON_POSITIVE_PRICE
    if h < l:
        return HIGH_BELOW_LOW
    if o > h or o < l or c > h or c < l:
        return OUTSIDE_RANGE
    if v < 0.0:
        return NEGATIVE_VOLUME
    return OK


@njit(cache=True, nogil=True, error_model="numpy")
def _first_problem(o, h, l, c, v):  # noqa: E741
    for i in range(o.shape[0]):
        p = candle_problem(o[i], h[i], l[i], c[i], v[i])
        if p != OK:
            return i, p
    return -1, OK


def as_columns(*cols: object) -> tuple[np.ndarray, ...]:
    """Contiguous float64 copies-if-needed of equal-length 1-D inputs."""
    arrays = tuple(np.ascontiguousarray(x, dtype=np.float64) for x in cols)
    n = arrays[0].shape[0]
    for a in arrays:
        if a.ndim != 1 or a.shape[0] != n:
            raise InvalidCandles(f"open/high/low/close/volume must be 1-D and equally long, got shapes "
                                 f"{[x.shape for x in arrays]}")
    return arrays


def describe(problem: int, where: str, o: float, h: float, l: float, c: float, v: float) -> str:  # noqa: E741
    return (
        f"{where}: {PROBLEMS[problem]} "
        f"(open={float(o)!r} high={float(h)!r} low={float(l)!r} close={float(c)!r} volume={float(v)!r})"
    )


def validate_ohlcv(o: np.ndarray, h: np.ndarray, l: np.ndarray, c: np.ndarray, v: np.ndarray,  # noqa: E741
                   first: int = 0) -> None:
    """Raise ``InvalidCandles`` naming the first impossible candle (``first``: the index of o[0])."""
    i, p = _first_problem(o, h, l, c, v)
    if i >= 0:
        raise InvalidCandles(describe(p, f"candle {first + i}", o[i], h[i], l[i], c[i], v[i]), index=int(first + i))


def validate_open_times(open_time: np.ndarray, interval_ms: int | None = None, allow_gaps: bool = False) -> None:
    """open_time must strictly increase; with ``interval_ms`` and not ``allow_gaps``, by exactly one interval.

    Real exchange outages leave holes that no backfill can fill (see
    shared/data/klines/README.md); pass ``allow_gaps=True`` to compute across
    them, which is also what the streaming engine does by default.
    """
    ot = np.asarray(open_time, dtype=np.int64)
    if ot.ndim != 1:
        raise InvalidCandles(f"open_time must be 1-D, got shape {ot.shape}")
    if ot.shape[0] < 2:
        return
    step = np.diff(ot)
    bad = np.flatnonzero(step <= 0)
    if bad.size:
        i = int(bad[0]) + 1
        raise InvalidCandles(
            f"candle {i}: open_time {int(ot[i])} does not increase (previous {int(ot[i - 1])})", index=i
        )
    if interval_ms is not None and not allow_gaps:
        bad = np.flatnonzero(step != interval_ms)
        if bad.size:
            i = int(bad[0]) + 1
            raise InvalidCandles(
                f"candle {i}: open_time jumps {int(step[i - 1])} ms after {int(ot[i - 1])}, expected "
                f"{interval_ms} ms (gap in the candles; allow_gaps to compute across it)",
                index=i,
            )
