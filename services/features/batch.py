"""Batch (training) API: every feature over a whole history, NaN during each feature's warm-up.

It runs the same ``kernels.step`` the streaming engine runs, over one state row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from services.features import kernels
from services.features.catalog import FEATURE_INDEX, resolve
from services.features.validation import as_columns, validate_ohlcv, validate_open_times

if TYPE_CHECKING:
    import pandas as pd

OHLCV = ("open", "high", "low", "close", "volume")


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
) -> np.ndarray:
    """All features as an (n_candles, N_FEATURES) matrix, columns in ``catalog.FEATURE_NAMES`` order.

    Raises ``InvalidCandles`` for impossible candles, and for non-increasing
    ``open_time`` (or, with ``interval_ms`` and not ``allow_gaps``, a gap).
    """
    o, h, l, c, v = as_columns(open, high, low, close, volume)  # noqa: E741
    validate_ohlcv(o, h, l, c, v)
    if open_time is not None:
        if len(open_time) != o.shape[0]:
            raise ValueError(f"open_time has {len(open_time)} rows, prices {o.shape[0]}")
        validate_open_times(open_time, interval_ms, allow_gaps)
    out = kernels.new_output(o.shape[0])
    kernels.run_series(kernels.new_state(1), 0, o, h, l, c, v, out, True)
    return out


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
) -> dict[str, np.ndarray]:
    """``{feature name: float64 array}`` (None: every feature), NaN during warm-up.

    Arrays are column views of one matrix (strided); ``np.ascontiguousarray`` one if needed.
    """
    selected = resolve(names)
    out = compute_matrix(
        open, high, low, close, volume, open_time=open_time, interval_ms=interval_ms, allow_gaps=allow_gaps
    )
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
    out = compute_matrix(
        *(candles[col].to_numpy(np.float64) for col in OHLCV),
        open_time=ot,
        interval_ms=interval_ms,
        allow_gaps=allow_gaps,
    )
    frame = pd.DataFrame(out[:, [FEATURE_INDEX[n] for n in selected]], columns=list(selected))
    if ot is not None:
        frame.insert(0, "open_time", ot)
    return frame
