"""Batch (training) API: every feature over a whole history, NaN during each feature's warm-up.

It runs the same ``kernels.step`` the streaming engine runs, over one state row
(only the indicator groups the asked features need; long inputs split the groups
over two threads, bit-identical to one).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Sequence

import numpy as np

from libs.indicators import kernels
from libs.indicators.catalog import FEATURE_INDEX, resolve
from libs.indicators.validation import as_columns, validate_ohlcv, validate_open_times

if TYPE_CHECKING:
    import pandas as pd

OHLCV = ("open", "high", "low", "close", "volume")
# Two lanes of indicator groups with about equal cost (measured by bench/bench_features.py); each
# lane runs on a private copy of the state row in its own thread (the kernels release the GIL).
LANES = (
    kernels.G_AVERAGES | kernels.G_OSCILLATORS | kernels.G_PATTERNS,
    kernels.G_BANDS | kernels.G_RANGES | kernels.G_FLOWS,
)
# Below this many candles a second thread costs more than it saves.
PARALLEL_MIN_CANDLES = 20_000
_pool: ThreadPoolExecutor | None = None


def _lanes_pool() -> ThreadPoolExecutor | None:
    global _pool
    if _pool is None and len(os.sched_getaffinity(0)) >= len(LANES):
        _pool = ThreadPoolExecutor(max_workers=len(LANES), thread_name_prefix="features-lane")
    return _pool


def run_history(
    st: np.ndarray,
    k: int,
    cols: tuple[np.ndarray, ...],
    out: np.ndarray,
    record: bool,
    groups: int = kernels.G_ALL,
) -> None:
    """``kernels.run_series`` over one state row, the groups split over two threads for long inputs.

    Every group touches only its own slice of the state row, so the lanes run on
    private copies of it and their slices are merged back: bit-identical to one
    ``run_series`` call with all groups.
    """
    lanes = [lane & groups for lane in LANES if lane & groups]
    pool = _lanes_pool()
    if len(lanes) < 2 or pool is None or cols[0].shape[0] < PARALLEL_MIN_CANDLES:
        kernels.run_series(st, k, *cols, out, record, groups)
        return
    private = [st[k : k + 1].copy() for _ in lanes]
    scratch = [out if record else kernels.new_output(1) for _ in lanes]
    futures = [
        pool.submit(kernels.run_series, row, 0, *cols, buf, record, lane)
        for row, buf, lane in zip(private, scratch, lanes)
    ]
    for f in futures:
        f.result()
    st[k] = private[0][0]
    for row, lane in zip(private[1:], lanes[1:]):
        sl = kernels.state_slots(lane)
        st[k, sl] = row[0, sl]


def compute_matrix(
    open: np.ndarray,  # noqa: A002  (the candle field's name)
    high: np.ndarray,
    low: np.ndarray,
    close: np.ndarray,
    volume: np.ndarray,
    *,
    open_time: np.ndarray | None = None,
    interval_ms: int | None = None,
    allow_gaps: bool = False,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """All features as an (n_candles, N_FEATURES) matrix, columns in ``catalog.FEATURE_NAMES`` order.

    ``out``: a C-contiguous float64 (n_candles, N_FEATURES) matrix to fill and return
    instead of a fresh one (repeated dataset builds skip allocating ~400 MB per 1e6 candles).
    Raises ``InvalidCandles`` for impossible candles, and for non-increasing
    ``open_time`` (or, with ``interval_ms`` and not ``allow_gaps``, a gap).
    """
    return _matrix(open, high, low, close, volume, open_time, interval_ms, allow_gaps, kernels.G_ALL, out)


def _matrix(
    open: np.ndarray,  # noqa: A002
    high: np.ndarray,
    low: np.ndarray,
    close: np.ndarray,
    volume: np.ndarray,
    open_time: np.ndarray | None,
    interval_ms: int | None,
    allow_gaps: bool,
    groups: int,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """The feature matrix with only the columns of ``groups`` computed (the others are undefined)."""
    o, h, l, c, v = as_columns(open, high, low, close, volume)  # noqa: E741
    validate_ohlcv(o, h, l, c, v)
    if open_time is not None:
        if len(open_time) != o.shape[0]:
            raise ValueError(f"open_time has {len(open_time)} rows, prices {o.shape[0]}")
        validate_open_times(open_time, interval_ms, allow_gaps)
    if out is None:
        out = kernels.new_output(o.shape[0])
    else:
        _check_out(out, o.shape[0])
    run_history(kernels.new_state(1), 0, (o, h, l, c, v), out, True, groups)
    return out


def _check_out(out: np.ndarray, n: int) -> None:
    want = (n, kernels.N_FEATURES)
    if not isinstance(out, np.ndarray) or out.dtype != np.float64 or out.shape != want:
        got = f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
        raise ValueError(f"out must be a float64 array of shape {want}, got {got}")
    if not (out.flags.c_contiguous and out.flags.writeable):
        raise ValueError("out must be C-contiguous and writeable")


def compute_batch(
    open: np.ndarray,  # noqa: A002
    high: np.ndarray,
    low: np.ndarray,
    close: np.ndarray,
    volume: np.ndarray,
    names: Sequence[str] | None = None,
    *,
    open_time: np.ndarray | None = None,
    interval_ms: int | None = None,
    allow_gaps: bool = False,
    out: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """``{feature name: float64 array}`` (None: every feature), NaN during warm-up.

    Arrays are column views of one matrix (strided); ``np.ascontiguousarray`` one if needed.
    ``out``: that matrix, as for ``compute_matrix`` (columns of features not asked may be
    left as they were or overwritten).
    """
    selected = resolve(names)
    groups = kernels.groups_for([FEATURE_INDEX[n] for n in selected])
    out = _matrix(open, high, low, close, volume, open_time, interval_ms, allow_gaps, groups, out)
    return {name: out[:, FEATURE_INDEX[name]] for name in selected}


def compute_frame(
    candles: "pd.DataFrame",
    names: Sequence[str] | None = None,
    *,
    interval_ms: int | None = None,
    allow_gaps: bool = False,
) -> "pd.DataFrame":
    """Features of a kline frame (columns open/high/low/close/volume, optional open_time).

    The result keeps ``open_time`` (when present) as the first column, then one
    column per feature, named as in docs/features.md.
    """
    import pandas as pd

    missing = [col for col in OHLCV if col not in candles.columns]
    if missing:
        raise ValueError(f"kline frame lacks columns {missing}")
    selected = resolve(names)
    ot = candles["open_time"].to_numpy(np.int64) if "open_time" in candles.columns else None
    groups = kernels.groups_for([FEATURE_INDEX[n] for n in selected])
    out = _matrix(*(candles[col].to_numpy(np.float64) for col in OHLCV), ot, interval_ms, allow_gaps, groups)
    frame = pd.DataFrame(out[:, [FEATURE_INDEX[n] for n in selected]], columns=list(selected))
    if ot is not None:
        frame.insert(0, "open_time", ot)
    return frame
