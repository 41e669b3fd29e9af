"""Batch (training) API: every feature over a whole history, NaN during each feature's warm-up.

The first ``fused.WARM`` candles run the same ``kernels.step`` the streaming engine runs; the rest
run ``fused``'s per-group loops, the same arithmetic with the state in registers (bit-identical,
tests/libs/indicators/test_fused.py). Only the indicator groups the asked features need run;
long inputs split the groups over two threads, bit-identical to one.
"""

from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Sequence

import numpy as np

from libs.common.cpus import available_cpus
from libs.indicators import fused, kernels
from libs.indicators.catalog import FEATURE_INDEX, resolve
from libs.indicators.validation import as_columns, validate_ohlcv, validate_open_times

if TYPE_CHECKING:
    import pandas as pd

OHLCV = ("open", "high", "low", "close", "volume")
# What each indicator group's fused loop costs over 1e6 candles (ms on one core of the bench box,
# contiguous rows, the 35 TA-Lib outputs; docs/features.md), and what the costly optional
# columns add: two threads split the asked groups so that both lanes cost about the same.
GROUP_COST = {
    kernels.G_AVERAGES: 13.4, kernels.G_OSCILLATORS: 10.2, kernels.G_BANDS: 10.7,
    kernels.G_RANGES: 12.8, kernels.G_FLOWS: 9.1, kernels.G_PATTERNS: 5.5,
}
COLUMN_COST = {
    kernels.F_HV: 16.0, kernels.F_CMF: 6.0, kernels.F_VPT: 2.0, kernels.F_PCH: 2.0, kernels.F_VCH: 2.0,
    kernels.F_KCU: 1.5, kernels.F_KCL: 1.5, kernels.F_BBW: 1.0, kernels.F_BBP: 1.0,
    kernels.F_OPEN: 1.0, kernels.F_HIGH: 1.0, kernels.F_LOW: 1.0, kernels.F_CLOSE: 1.0, kernels.F_VOLUME: 1.0,
}
# Below this many candles a second thread costs more than it saves.
PARALLEL_MIN_CANDLES = 20_000
_pool: ThreadPoolExecutor | None = None
# Opt-in, for a process that computes many large batches one after another (a backtest loop):
# a fresh result's buffer is kept after the call (the latest of each shape, at most two shapes:
# compute_matrix's (candles, features) and compute_batch's (features, candles)) and handed to the
# next call of that shape once nothing refers to it any more (the caller dropped every returned
# array): writing a never-touched 1e6-candle buffer costs its page faults (the kernel zeroing
# ~280 MB for the 35 TA-Lib outputs), ~0.1-0.2x TA-Lib's time. Off by default because the kept
# buffers stay allocated between calls (8 * 49 bytes per candle each, ~390 MB at 1e6 candles),
# which a service with a memory limit (inference's archive backfill, the trainer) must not pay
# unasked; a caller that loops can pass ``out=`` instead. ``release_buffers()`` drops the kept ones.
REUSE_OUTPUT = False
OUTPUT_MIN_CANDLES = 100_000  # smaller buffers are cheap to fault in: not kept
KEEP_SHAPES = 2
_spare: dict[tuple[int, int], np.ndarray] = {}
_spare_lock = threading.Lock()


def release_buffers() -> None:
    """Forget the kept output buffers (their memory is freed once no returned array refers to them)."""
    with _spare_lock:
        _spare.clear()


def _fresh(shape: tuple[int, int]) -> np.ndarray:
    """An uninitialised float64 array: the kept buffer when it has this shape and nobody holds it."""
    if not REUSE_OUTPUT or shape[0] * shape[1] < OUTPUT_MIN_CANDLES * kernels.N_FEATURES:
        return np.empty(shape, dtype=np.float64)
    with _spare_lock:
        spare = _spare.pop(shape, None)
        # held only by ``spare`` (+1 for getrefcount's argument): no view of it is alive
        if spare is None or sys.getrefcount(spare) != 2:
            spare = np.empty(shape, dtype=np.float64)
        _spare[shape] = spare  # the newest last
        while len(_spare) > KEEP_SHAPES:
            del _spare[next(iter(_spare))]
        return spare


def _lanes_pool() -> ThreadPoolExecutor | None:
    """One worker thread: the calling thread runs the other lane (the kernels release the GIL)."""
    global _pool
    if _pool is None and available_cpus() >= 2:  # the pod's CPU limit, not the node's cores
        _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="features-lane")
    return _pool


# Into a (candles, features) matrix the two lanes write columns of the same rows: every cache
# line a lane shares with the other moves between the cores. Each place where the asked columns
# pass from one lane's to the other's counts as this many ms (the 35 TA-Lib outputs into out=, 2
# threads, interleaved: averages+oscillators+bands | ranges+flows+patterns, 1 place, was 0.95x
# the cost-balanced split's time with 8 places, in each of 5 runs, though it costs 1.08x more;
# contiguous rows share no line and count nothing).
SHARED_ROW_SWITCH_COST = 2.0


def split_lanes(groups: int, want: np.ndarray, shared_rows: bool = False) -> tuple[int, int]:
    """The asked groups as two masks of about equal cost (``GROUP_COST`` + ``COLUMN_COST``, and with
    ``shared_rows`` the lane switches along a row), the costlier first (for the calling thread,
    which starts first). Either may be 0."""
    cost = {g: c for g, c in GROUP_COST.items() if g & groups}
    for f, c in COLUMN_COST.items():
        g = int(kernels.GROUP_OF_COLUMN[f])
        if g in cost and want[f]:
            cost[g] += c
    members = list(cost)
    row = [int(kernels.GROUP_OF_COLUMN[f]) for f in range(kernels.N_FEATURES)
           if want[f] and kernels.GROUP_OF_COLUMN[f] & groups]
    total = sum(cost.values())
    best, best_score = (groups, 0), total
    for pick in range(1 << len(members)):
        mask = sum(g for i, g in enumerate(members) if pick >> i & 1)
        a = sum(cost[g] for g in members if g & mask)
        score = max(a, total - a)
        if shared_rows:
            score += SHARED_ROW_SWITCH_COST * sum(bool(x & mask) != bool(y & mask) for x, y in zip(row, row[1:]))
        if score < best_score:
            best, best_score = ((mask, groups & ~mask) if 2 * a >= total else (groups & ~mask, mask)), score
    return best


def run_history(
    st: np.ndarray,
    k: int,
    cols: tuple[np.ndarray, ...],
    out: np.ndarray,
    record: bool,
    groups: int = kernels.G_ALL,
) -> None:
    """``kernels.run_series`` over state row k (record: ``out`` is (candles, features)), fused.

    record=False (no output) runs ``kernels.run_series`` itself.
    """
    if not record:
        kernels.run_series(st, k, *cols, out, record, groups)
        return
    run_fused(st[k], cols, out.T, groups)


def run_fused(
    row: np.ndarray, cols: tuple[np.ndarray, ...], dest: np.ndarray, groups: int, want: np.ndarray = fused.ALL,
    check: bool = False,
) -> None:
    """The history ``cols`` through state ``row`` (1-D), values into ``dest[feature, candle]``.

    ``kernels.step`` for the first ``fused.WARM`` candles, then the fused loops of the groups,
    split over two threads for long inputs: the groups read and write disjoint slices of the
    state row and disjoint rows of ``dest``, so the threads share both (no copies).
    ``check``: raise ``InvalidCandles`` for the first impossible candle, found chunk by chunk as
    the groups go (the lighter lane checks): ``dest`` may then be partly written.
    """
    if check:
        validate_ohlcv(*(x[: fused.WARM] for x in cols))  # what ``prefix`` reads
    start = fused.prefix(row, *cols, dest, groups, want)
    mine, other = split_lanes(groups, want, shared_rows=dest.strides[0] < dest.strides[1])
    pool = _lanes_pool()
    if not other or pool is None or cols[0].shape[0] - start < PARALLEL_MIN_CANDLES:
        bad = fused.run_groups(row, start, *cols, dest, groups, want, check)
    else:
        future = pool.submit(fused.run_groups, row, start, *cols, dest, other, want, check)
        try:
            fused.run_groups(row, start, *cols, dest, mine, want, False)
        finally:
            bad = future.result()
    if bad >= 0:
        validate_ohlcv(*(x[bad:] for x in cols), first=bad)
    fused.finish(row, start, *cols)


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
    Raises ``InvalidCandles`` for impossible candles (found as the groups go, chunk by chunk:
    ``out`` may then be partly written), and for non-increasing ``open_time`` (or, with
    ``interval_ms`` and not ``allow_gaps``, a gap; checked before anything is written).
    """
    if out is None:
        out = _fresh((len(close), kernels.N_FEATURES))
    _matrix(open, high, low, close, volume, open_time, interval_ms, allow_gaps, kernels.G_ALL, out)
    return out


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
    want: np.ndarray = fused.ALL,
) -> np.ndarray:
    """The features indexed [feature, candle] with only the rows of ``groups`` computed (the others are
    undefined): ``out.T`` when ``out`` (candles, features) is given, else a fresh (features, candles)
    array, whose rows are contiguous and whose untouched rows cost no memory (never written)."""
    o, h, l, c, v = as_columns(open, high, low, close, volume)  # noqa: E741
    if open_time is not None:
        if len(open_time) != o.shape[0]:
            raise ValueError(f"open_time has {len(open_time)} rows, prices {o.shape[0]}")
        validate_open_times(open_time, interval_ms, allow_gaps)
    if out is None:
        dest = _fresh((kernels.N_FEATURES, o.shape[0]))
    else:
        _check_out(out, o.shape[0])
        dest = out.T
    # the candles are validated as the groups read them: on InvalidCandles ``out`` may be partly written
    run_fused(kernels.new_state(1)[0], (o, h, l, c, v), dest, groups, want, check=True)
    return dest


def _want(names: Sequence[str]) -> np.ndarray:
    """The asked columns (the state row is thrown away after, so unasked ones may be skipped)."""
    want = np.zeros(kernels.N_FEATURES, dtype=np.bool_)
    want[[FEATURE_INDEX[n] for n in names]] = True
    return want


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

    Arrays are rows of one (features, candles) array, each contiguous; with ``out`` (a
    (candles, features) matrix, as for ``compute_matrix``; columns of features not asked may be
    left as they were or overwritten) they are column views of it (strided).
    """
    selected = resolve(names)
    groups = kernels.groups_for([FEATURE_INDEX[n] for n in selected])
    dest = _matrix(open, high, low, close, volume, open_time, interval_ms, allow_gaps, groups, out, _want(selected))
    return {name: dest[FEATURE_INDEX[name]] for name in selected}


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
    dest = _matrix(*(candles[col].to_numpy(np.float64) for col in OHLCV), ot, interval_ms, allow_gaps, groups, None,
                   _want(selected))
    frame = pd.DataFrame(dest[[FEATURE_INDEX[n] for n in selected]].T, columns=list(selected))
    if ot is not None:
        frame.insert(0, "open_time", ot)
    return frame
