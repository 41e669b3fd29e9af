"""One batch of candles applied to the indicator state, each candle judged alone.

A candle is rejected, with its reason, before it changes anything when its numbers are beyond
what a Binance kline can carry (``bounds``) or the engine finds it impossible. The batch is then
applied in one engine call, as a transaction over the keys it touches: a key whose values or
state come out non-finite is put back as it was and its candles are applied again one at a
time, so only the candle that would poison it is rejected and its batch-mates (of its own key
and of every other) are published. Anything raised on the way puts every touched key back, so a
retry of the batch finds the state as it was, not a batch of duplicates.

Every event carries its key's ``feature_origin``: the open time of the first candle folded into
the key's state (``origins``, kept by the caller beside the engine, whose snapshot cannot hold
it). A key without state starts it at its first applied candle; under ``gap_policy="reset"`` a
candle after a gap starts it again. Cumulative indicators (OBV, VPT) are offset by everything
folded before, so inference compares this with the origin a model was trained from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from libs.common.contracts import FeaturesEvent, KlineEvent, Prepared
from libs.indicators.kernels import ST_DUPLICATE, ST_INVALID, ST_OK
from libs.indicators.streaming import StreamingEngine, UpdateBatch
from services.features import bounds


@dataclass
class Applied:
    """What a batch gave: per candle the event to publish (None: a duplicate or rejected)."""

    fresh: list[Prepared | None]
    rejected: list[tuple[KlineEvent, str]] = field(default_factory=list)
    duplicates: int = 0
    gaps: list[tuple[KlineEvent, int]] = field(default_factory=list)  # (candle, ms late)

    @property
    def publish(self) -> list[Prepared]:
        return [e for e in self.fresh if e is not None]


Origins = dict[tuple[str, str], "int | None"]


def apply(engine: StreamingEngine, events: list[KlineEvent], computed_at: int, origins: Origins) -> Applied:
    """``origins``: per key with state, its first folded candle (None: unknown); updated here."""
    n = len(events)
    if not n:
        return Applied([])
    touched = {(e.symbol, e.interval) for e in events}
    saved_origins = {k: origins[k] for k in touched if k in origins}
    stateless = {k for k in touched if engine.last_open_time(k) is None}
    # One conversion for the batch (float64 holds ms timestamps exactly up to 2**53).
    cols = np.array([(e.open_time, e.open, e.high, e.low, e.close, e.volume) for e in events], dtype=np.float64).T
    rejected = bounds.beyond(events, cols)
    keep = np.array([i for i in range(n) if i not in rejected], dtype=np.int64) if rejected else None
    rows = engine.slots([(e.symbol, e.interval) for e in events])
    if keep is not None:
        rows, cols = rows[keep], cols[:, keep]
    saved = engine.save_rows(rows)
    try:
        result = engine.update_slots(rows, cols[0].astype(np.int64), cols[1], cols[2], cols[3], cols[4], cols[5])
        poisoned = _poisoned(engine, result, rows, saved.rows)
        if poisoned.size:
            engine.restore_rows(saved, poisoned)
            for j in np.flatnonzero(np.isin(rows, poisoned)).tolist():
                reason = _apply_one(engine, result, rows, cols, j)
                if reason is not None:
                    i = j if keep is None else int(keep[j])
                    e = events[i]
                    rejected[i] = f"{e.symbol} {e.interval} open_time={e.open_time}: {reason}"
        return _outcome(engine, events, result, keep, rejected, computed_at, origins, stateless)
    except BaseException:
        engine.restore_rows(saved)
        for k in touched:
            origins.pop(k, None)
        origins.update(saved_origins)
        raise


def _poisoned(engine: StreamingEngine, result: UpdateBatch, rows: np.ndarray, touched: np.ndarray) -> np.ndarray:
    """The state rows whose values (where warm) or state hold a number that is not finite."""
    ok = result.status == ST_OK
    bad_values = ok & ~np.isfinite(result.values).all(axis=1)
    bad = set(rows[bad_values].tolist()) if bad_values.any() else set()
    finite = engine.finite_rows(touched)
    if not finite.all():
        bad.update(touched[~finite].tolist())
    return np.array(sorted(bad), dtype=np.int64)


def _apply_one(engine: StreamingEngine, result: UpdateBatch, rows: np.ndarray, cols: np.ndarray, j: int) -> str | None:
    """Apply candle ``j`` of the batch alone, writing its outcome into ``result``; put its key
    back and return why when it would leave something non-finite."""
    row = rows[j : j + 1]
    one_saved = engine.save_rows(row)
    one = engine.update_slots(row, cols[0, j : j + 1].astype(np.int64), *(cols[c, j : j + 1] for c in range(1, 6)))
    st = int(one.status[0])
    values_bad = st == ST_OK and not np.isfinite(one.values[0]).all()
    if values_bad or not engine.finite_rows(row).all():
        engine.restore_rows(one_saved)
        result.status[j] = ST_INVALID
        result.reasons[j] = ""
        if values_bad:
            names = [n for n, v in zip(result.names, one.values[0].tolist()) if not np.isfinite(v)]
            return f"indicators would not be finite ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
        return "the indicator state would not be finite"
    result.status[j] = st
    result.gap_ms[j] = one.gap_ms[0]
    result.values[j] = one.values[0]
    if st == ST_INVALID:
        result.reasons[j] = one.reasons[0]
    return None


def _outcome(engine: StreamingEngine, events: list[KlineEvent], result: UpdateBatch, keep: np.ndarray | None,
             rejected: dict[int, str], computed_at: int, origins: Origins, stateless: set) -> Applied:
    n = len(events)
    out = Applied([None] * n)
    names = result.names
    status = result.status.tolist()
    rows = result.values.tolist()  # one conversion, not one per event
    gap_ms = result.gap_ms.tolist()
    feature_set_id = engine.feature_set.id
    restarts_on_gap = engine.gap_policy == "reset"  # the kernel zeroes the state at a gap
    index = range(n) if keep is None else keep.tolist()
    for j, i in enumerate(index):
        st = status[j]
        if i in rejected:
            continue
        e = events[i]
        if st == ST_INVALID:
            rejected[i] = f"{e.symbol} {e.interval} open_time={e.open_time}: {result.reasons[j].split(': ', 1)[-1]}"
            continue
        if st == ST_DUPLICATE:
            out.duplicates += 1
            continue
        if gap_ms[j]:
            out.gaps.append((e, gap_ms[j]))
        key = (e.symbol, e.interval)
        if key in stateless or (restarts_on_gap and gap_ms[j]):
            stateless.discard(key)
            origins[key] = e.open_time
        elif key not in origins:  # state the engine got past ``origins``: where it started is not known
            origins[key] = None
        values = dict(zip(names, rows[j])) if st == ST_OK else {}
        out.fresh[i] = FeaturesEvent.prepared(
            e.symbol, e.interval, e.open_time, e.close, feature_set_id, values, st == ST_OK, e.ingested_at,
            computed_at, origins[key],
        )
    out.rejected = [(events[i], rejected[i]) for i in sorted(rejected)]
    return out
