"""Streaming (serving) API: O(1) work per closed candle per (symbol, interval) key.

Each key owns one row of a float64 state matrix; ``update_many`` pushes one
candle into each of many rows in a single numba call (``kernels.update_rows``,
which runs the very ``kernels.step`` that batch runs).

Semantics, per key (symbol, interval):

* **Idempotent**: a candle whose open_time is <= the last one applied is ignored
  (status ``duplicate``) and changes nothing, so re-delivered events are harmless.
* **Gaps**: a candle opening more than one interval after the previous one is
  applied and reported (``gap_ms`` > 0). With ``gap_policy="continue"`` (default)
  indicators run across the hole exactly as batch does over an archive with the
  same hole (real exchange outages leave such holes); ``"reset"`` drops the key's
  state and restarts its warm-up at this candle.
* **Warm-up**: ``values`` is None until the key has consumed
  ``warmup_candles`` candles; after that every value is a real number, never NaN.
* **Invalid candles** (NaN, price <= 0, high < low, open/close outside [low, high],
  negative volume) raise ``InvalidCandles`` from ``update``; ``update_many``
  marks them ``invalid`` with a reason and leaves that key's state untouched.
"""

from __future__ import annotations

import hashlib
import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Hashable, Iterator, Literal, Sequence

import numpy as np

from libs.common.klines import interval_ms as interval_to_ms
from libs.common.cpus import available_cpus
from libs.indicators import kernels
from libs.indicators.catalog import FEATURE_INDEX
from libs.indicators.feature_sets import DEFAULT_FEATURE_SET, FeatureSet, get_feature_set
from libs.indicators.validation import (
    PROBLEMS,
    InvalidCandles,
    as_columns,
    describe,
    validate_ohlcv,
    validate_open_times,
)

Key = tuple[str, str]  # (symbol, interval), e.g. ("BTCUSDT", "1m")
GapPolicy = Literal["continue", "reset"]
STATUS_NAMES = {
    kernels.ST_OK: "ok",
    kernels.ST_WARMING: "warming",
    kernels.ST_DUPLICATE: "duplicate",
    kernels.ST_INVALID: "invalid",
}
# A snapshot is only valid for the exact kernel that wrote it: any change to the
# kernel source (state layout or arithmetic) forces a rebuild from history.
KERNEL_FINGERPRINT = hashlib.sha256(Path(kernels.__file__).read_bytes()).hexdigest()[:16]
_SNAPSHOT_FORMAT = 1


# Two threads when a call carries enough rows to pay for them (the kernels release the GIL).
# Off by default: bench/bench_features.py measured the two-lane path at 1.2-2.6x the time of one
# thread for 256..16,000 keys per call on the 2-core machine (lanes interleave by state row, so
# both threads write the same cache lines of status/gap/out; and the features service's event
# loop and Redis want the second core). PARALLEL_ROWS = True turns it back on.
LANES = 2
PARALLEL_ROWS = False
PARALLEL_MIN_ROWS = 256
_pool: ThreadPoolExecutor | None = None


def _lanes_pool() -> ThreadPoolExecutor | None:
    global _pool
    if _pool is None and available_cpus() >= LANES:  # the pod's CPU limit, not the node's cores
        _pool = ThreadPoolExecutor(max_workers=LANES, thread_name_prefix="features-keys")
    return _pool


class SnapshotMismatch(ValueError):
    """The snapshot was written by another kernel or feature set; rebuild state from history."""


@dataclass(frozen=True, slots=True)
class Update:
    """Outcome of one candle for one key."""

    status: str  # "ok" | "warming" | "duplicate" | "invalid"
    values: dict[str, float] | None  # the feature set's values when status == "ok"
    gap_ms: int = 0  # > 0: this candle opened gap_ms later than one interval after the previous one
    reason: str | None = None  # why, when status == "invalid"

    @property
    def applied(self) -> bool:
        return self.status in ("ok", "warming")


@dataclass(frozen=True, slots=True)
class UpdateBatch:
    """Outcome of ``update_many``: row i is candle i of the call."""

    names: tuple[str, ...]
    status: np.ndarray  # int8, kernels.ST_*
    gap_ms: np.ndarray  # int64
    values: np.ndarray  # (rows, len(names)) float64; meaningful where status == ST_OK
    reasons: dict[int, str]  # row -> one-line reason, for invalid rows

    def __len__(self) -> int:
        return int(self.status.shape[0])

    def update(self, i: int) -> Update:
        st = int(self.status[i])
        values = dict(zip(self.names, self.values[i].tolist())) if st == kernels.ST_OK else None
        return Update(STATUS_NAMES[st], values, int(self.gap_ms[i]), self.reasons.get(i))

    def __iter__(self) -> Iterator[Update]:
        return (self.update(i) for i in range(len(self)))


@dataclass(frozen=True, slots=True)
class SavedRows:
    """State rows as they were (``StreamingEngine.save_rows``)."""

    rows: np.ndarray  # int64, sorted, unique
    state: np.ndarray  # copies, not views (fancy indexing copies)
    last: np.ndarray


class StreamingEngine:
    """Per-key indicator state for one feature set; see the module docstring for the semantics."""

    def __init__(
        self,
        feature_set: str | FeatureSet = DEFAULT_FEATURE_SET,
        *,
        capacity: int = 64,
        gap_policy: GapPolicy = "continue",
    ) -> None:
        if gap_policy not in ("continue", "reset"):
            raise ValueError(f"gap_policy must be 'continue' or 'reset', got {gap_policy!r}")
        self.feature_set = get_feature_set(feature_set)
        self.gap_policy: GapPolicy = gap_policy
        self._columns = np.array([FEATURE_INDEX[n] for n in self.feature_set.features], dtype=np.int64)
        self._all_columns = bool(np.array_equal(self._columns, np.arange(kernels.N_FEATURES)))
        # only the indicator groups this set needs run (a set never changes, nor does its engine's)
        self._groups = kernels.groups_for(self._columns)
        self._slots: dict[Hashable, int] = {}
        self._keys: list[Hashable] = []
        capacity = max(1, capacity)
        self._state = kernels.new_state(capacity)
        self._last = np.full(capacity, kernels.NO_TIME, dtype=np.int64)
        self._interval = np.zeros(capacity, dtype=np.int64)

    # ---- keys ------------------------------------------------------------------------

    @property
    def names(self) -> tuple[str, ...]:
        return self.feature_set.features

    @property
    def warmup_candles(self) -> int:
        """Candles a key consumes before ``update`` first returns values (that candle included)."""
        return self.feature_set.warmup_candles

    def keys(self) -> list[Hashable]:
        return list(self._keys)

    def last_open_time(self, key: Key) -> int | None:
        slot = self._slots.get(key)
        if slot is None or self._last[slot] == kernels.NO_TIME:
            return None
        return int(self._last[slot])

    def candles_seen(self, key: Key) -> int:
        slot = self._slots.get(key)
        return 0 if slot is None else int(self._state[slot, kernels.T])

    def slot(self, key: Key) -> int:
        """The state row of ``key`` (created on first use). Keys are (symbol, interval) tuples."""
        slot = self._slots.get(key)
        if slot is None:
            symbol, interval = key
            step_ms = interval_to_ms(interval)
            slot = len(self._keys)
            if slot == self._state.shape[0]:
                self._grow(2 * slot)
            self._slots[key] = slot
            self._keys.append((symbol, interval))
            self._interval[slot] = step_ms
        return slot

    def slots(self, keys: Sequence[Key]) -> np.ndarray:
        """State rows for many keys; cache the result to skip the lookups on hot paths."""
        get = self._slots.get
        rows = [get(k) for k in keys]
        if None in rows:
            rows = [self.slot(k) for k in keys]
        return np.asarray(rows, dtype=np.int64)

    def _grow(self, capacity: int) -> None:
        n = self._state.shape[0]
        state = kernels.new_state(capacity)
        state[:n] = self._state
        last = np.full(capacity, kernels.NO_TIME, dtype=np.int64)
        last[:n] = self._last
        interval = np.zeros(capacity, dtype=np.int64)
        interval[:n] = self._interval
        self._state, self._last, self._interval = state, last, interval

    def reset(self, key: Key) -> None:
        """Forget a key's state (its next candle starts a fresh warm-up)."""
        slot = self._slots.get(key)
        if slot is not None:
            self._state[slot] = 0.0
            self._last[slot] = kernels.NO_TIME

    def save_rows(self, rows: np.ndarray) -> "SavedRows":
        """A copy of some keys' state rows (``slots``), for a caller that applies candles as a
        transaction: ``restore_rows`` puts them back. Costs one copy of the touched rows only."""
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        return SavedRows(rows, self._state[rows], self._last[rows])

    def restore_rows(self, saved: "SavedRows", rows: np.ndarray | None = None) -> None:
        """Put back the saved rows (or only ``rows`` among them) as they were when saved."""
        pick = slice(None) if rows is None else np.isin(saved.rows, rows)
        self._state[saved.rows[pick]] = saved.state[pick]
        self._last[saved.rows[pick]] = saved.last[pick]

    def finite_rows(self, rows: np.ndarray) -> np.ndarray:
        """Per given row: whether every number of its state is finite (a state that is not can
        never give finite values again)."""
        return np.isfinite(self._state[rows]).all(axis=1)

    # ---- updates ---------------------------------------------------------------------

    def update(
        self, key: Key, open_time: int, o: float, h: float, l: float, c: float, v: float  # noqa: E741
    ) -> Update:
        """One closed candle of one key. Raises ``InvalidCandles`` for an impossible candle."""
        batch = self.update_many([key], [open_time], [o], [h], [l], [c], [v])
        result = batch.update(0)
        if result.status == "invalid":
            raise InvalidCandles(f"{key[0]} {key[1]} open_time={open_time}: {result.reason.split(': ', 1)[1]}")
        return result

    def update_many(
        self,
        keys: Sequence[Key],
        open_time: Sequence[int] | np.ndarray,
        o: Sequence[float] | np.ndarray,
        h: Sequence[float] | np.ndarray,
        l: Sequence[float] | np.ndarray,  # noqa: E741
        c: Sequence[float] | np.ndarray,
        v: Sequence[float] | np.ndarray,
    ) -> UpdateBatch:
        """One candle per row, for many keys (a key may repeat; its rows apply in order)."""
        return self.update_slots(self.slots(keys), open_time, o, h, l, c, v)

    def update_slots(
        self,
        rows: np.ndarray,
        open_time: Sequence[int] | np.ndarray,
        o: Sequence[float] | np.ndarray,
        h: Sequence[float] | np.ndarray,
        l: Sequence[float] | np.ndarray,  # noqa: E741
        c: Sequence[float] | np.ndarray,
        v: Sequence[float] | np.ndarray,
    ) -> UpdateBatch:
        """``update_many`` with state rows from ``slots`` instead of keys."""
        rows = np.asarray(rows, dtype=np.int64)
        ot = np.ascontiguousarray(open_time, dtype=np.int64)
        o_, h_, l_, c_, v_ = as_columns(o, h, l, c, v)
        n = rows.shape[0]
        if ot.shape[0] != n or o_.shape[0] != n:
            raise ValueError(f"{n} keys but {ot.shape[0]} open times and {o_.shape[0]} candles")
        out = kernels.new_output(n)
        status = np.empty(n, dtype=np.int8)
        gap = np.empty(n, dtype=np.int64)
        problem = np.empty(n, dtype=np.int8)
        args = (
            self._state, self._last, self._interval, rows, ot, o_, h_, l_, c_, v_, out, status, gap, problem,
            self.feature_set.lookback, self.gap_policy == "reset", self._groups,
        )
        pool = _lanes_pool()
        if pool is None or n < PARALLEL_MIN_ROWS or not PARALLEL_ROWS:
            kernels.update_rows(*args, 0, 1)
        else:  # keys split by state row parity: each key's rows stay in order in one thread
            futures = [pool.submit(kernels.update_rows, *args, lane, LANES) for lane in range(LANES)]
            for f in futures:
                f.result()
        reasons: dict[int, str] = {}
        if (status == kernels.ST_INVALID).any():
            for i in np.flatnonzero(status == kernels.ST_INVALID).tolist():
                reasons[i] = describe(int(problem[i]), f"row {i}", o_[i], h_[i], l_[i], c_[i], v_[i])
        values = out if self._all_columns else out[:, self._columns]
        return UpdateBatch(self.names, status, gap, values, reasons)

    def warmup(
        self,
        key: Key,
        open_time: Sequence[int] | np.ndarray,
        o: Sequence[float] | np.ndarray,
        h: Sequence[float] | np.ndarray,
        l: Sequence[float] | np.ndarray,  # noqa: E741
        c: Sequence[float] | np.ndarray,
        v: Sequence[float] | np.ndarray,
    ) -> int:
        """Feed a key's history (oldest first) without producing values; returns candles applied.

        Candles not newer than the key's last open_time are skipped, so warming up
        from an archive that overlaps a restored snapshot is safe. Gaps are
        computed across (as batch does). Raises ``InvalidCandles`` on bad history.
        """
        ot = np.ascontiguousarray(open_time, dtype=np.int64)
        o_, h_, l_, c_, v_ = as_columns(o, h, l, c, v)
        validate_ohlcv(o_, h_, l_, c_, v_)
        validate_open_times(ot)
        slot = self.slot(key)
        last = self._last[slot]
        start = 0 if last == kernels.NO_TIME else int(np.searchsorted(ot, last, side="right"))
        if start == ot.shape[0]:
            return 0
        if self.gap_policy == "reset" and last != kernels.NO_TIME and ot[start] - last > self._interval[slot]:
            self._state[slot] = 0.0
        kernels.run_series(
            self._state, slot, o_[start:], h_[start:], l_[start:], c_[start:], v_[start:],
            kernels.new_output(1), False, self._groups,
        )
        self._last[slot] = ot[-1]
        return int(ot.shape[0] - start)

    def is_warm(self, key: Key) -> bool:
        return self.candles_seen(key) >= self.warmup_candles

    # ---- checkpoints -----------------------------------------------------------------

    def snapshot(self) -> bytes:
        """Every key's state as bytes (numpy .npz, no pickle), restorable by ``restore``."""
        n = len(self._keys)
        meta = {
            "format": _SNAPSHOT_FORMAT,
            "kernel": KERNEL_FINGERPRINT,
            "state_size": kernels.STATE_SIZE,
            "feature_set": self.feature_set.id,
            "keys": [list(k) for k in self._keys],
        }
        buf = io.BytesIO()
        np.savez(
            buf,
            meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
            state=self._state[:n],
            last=self._last[:n],
        )
        return buf.getvalue()

    def restore(self, data: bytes) -> int:
        """Replace all state with a snapshot's; returns the number of keys restored.

        Raises ``SnapshotMismatch`` when the snapshot came from a different kernel
        (state layout or arithmetic) or feature set: rebuild from history instead.
        """
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                meta = json.loads(z["meta"].tobytes())
                state, last = z["state"], z["last"]
        except Exception as exc:  # a truncated or foreign file: one clear line
            raise SnapshotMismatch(f"not a features snapshot ({type(exc).__name__}: {exc})") from None
        for field, want in (
            ("format", _SNAPSHOT_FORMAT),
            ("kernel", KERNEL_FINGERPRINT),
            ("state_size", kernels.STATE_SIZE),
            ("feature_set", self.feature_set.id),
        ):
            if meta.get(field) != want:
                raise SnapshotMismatch(f"snapshot {field} is {meta.get(field)!r}, this engine has {want!r}")
        keys = [tuple(k) for k in meta["keys"]]
        fresh = StreamingEngine(self.feature_set, capacity=max(1, len(keys)), gap_policy=self.gap_policy)
        fresh.slots(keys)
        fresh._state[: len(keys)] = state
        fresh._last[: len(keys)] = last
        self._slots, self._keys = fresh._slots, fresh._keys
        self._state, self._last, self._interval = fresh._state, fresh._last, fresh._interval
        return len(keys)


__all__ = [
    "InvalidCandles",
    "Key",
    "SavedRows",
    "PROBLEMS",
    "SnapshotMismatch",
    "StreamingEngine",
    "Update",
    "UpdateBatch",
]
