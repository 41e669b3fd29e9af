"""Time-ordered train / validation / test splits with an embargo (no shuffling across time).

A sample is identified by the row of its last candle; it uses candles ``row - window + 1 ..
row + 1`` (the chart and the next candle that labels it). A later split starts only where its
first chart no longer reaches back to a candle of the earlier split, i.e. at least
``window + 1`` rows after the earlier split's last sample (lookback + horizon, the trainer's
rule). The dropped samples are the embargo; their count is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPLITS = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)


@dataclass(frozen=True)
class SplitPlan:
    assignment: np.ndarray  # per sample: 0 train, 1 val, 2 test, -1 embargoed
    embargo_rows: int

    def count(self, name: str) -> int:
        return int((self.assignment == SPLITS.index(name)).sum())

    @property
    def embargoed(self) -> int:
        return int((self.assignment < 0).sum())


def time_splits(rows: np.ndarray, embargo_rows: int, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> SplitPlan:
    """Assign samples (sorted by ``rows``, their last-candle row) to consecutive time slices."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"split fractions must be three positive numbers summing to 1, got {fractions}")
    if len(rows) > 1 and (np.diff(rows) <= 0).any():
        raise ValueError("samples must be in time order")
    n = len(rows)
    out = np.full(n, -1, dtype=np.int64)
    cuts = [0, int(round(n * fractions[0])), int(round(n * (fractions[0] + fractions[1]))), n]
    last_row = None
    for k in range(3):
        idx = np.arange(cuts[k], cuts[k + 1])
        if last_row is not None:
            idx = idx[rows[idx] >= last_row + embargo_rows]
        out[idx] = k
        if len(idx):
            last_row = int(rows[idx[-1]])
    plan = SplitPlan(out, embargo_rows)
    empty = [s for s in SPLITS if plan.count(s) == 0]
    if empty:
        raise ValueError(
            f"{n} samples leave no {'/'.join(empty)} split after a {embargo_rows}-candle embargo; use more candles"
        )
    return plan
