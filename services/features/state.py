"""The features service's domain state machine: every key's indicator state, the warm-up waiting
room and the checkpoint position. It knows nothing of Redis or of asyncio; the component
(``component``) drives it and carries its results to the bus.

Its states per key: unknown -> waiting (candles held while its history is read) -> warm (candles
applied as they come); a key whose history cannot be used is *cold*: it warms up live.

Checkpoint rule: a snapshot plus its entry id must rebuild, by replaying the entries after that
id, exactly the state of a run that never stopped, and the replay must publish what was never
published. The entry id never passes a waiting candle. A key that waits may already hold state
when a snapshot is taken (its history, or its held candles in the middle of their release): a
restore drops whatever the snapshot holds of a waiting key, and the replay warms it from its
history and publishes its candles again, through the once-per-candle guard, which keeps the
ones published before. So a stop or a failure at any step of a release publishes every held
candle exactly once.

Feature origin: per key with state, the open time of the first candle folded into it (the first
history candle of its warm-up, or its first live candle when it warms up live; under the reset
gap policy, the candle after a gap). Every features.v1 event carries it, because cumulative
indicators (OBV, VPT) depend on it and inference refuses a window of an origin a model was not
trained from. It lives beside the engine (whose snapshot format is not ours) and travels in the
checkpoint; one written before origins were recorded restores its keys with an unknown origin
(None is published) until their state is rebuilt.
"""

from __future__ import annotations

import logging
from typing import Iterable, Mapping

from libs.common.contracts import KlineEvent
from libs.indicators.streaming import SnapshotMismatch, StreamingEngine
from services.features import applying, position
from services.features.applying import Applied
from services.features.waiting import Key, WaitingRoom

log = logging.getLogger("klinebus.features")


class FeaturesState:
    def __init__(self, feature_set: str, gap_policy: str, *, warms_up: bool) -> None:
        self.engine = StreamingEngine(feature_set, gap_policy=gap_policy)  # type: ignore[arg-type]
        self.waiting = WaitingRoom()
        # Keys whose warm-up was given up: they warm up live, their history is never read again.
        self.cold: set[Key] = set()
        self.warms_up = warms_up  # False: no history source, every key warms up live
        self.last_entry = "0-0"  # the last klines.v1 entry folded into the state
        # Every key with state, and only those: the open time of its first folded candle (None: unknown).
        self.origins: dict[Key, int | None] = {}

    # --- candles -------------------------------------------------------------------------

    def needs_history(self, key: Key) -> bool:
        return self.warms_up and key not in self.cold and self.engine.last_open_time(key) is None

    def admit(self, events: list[KlineEvent], entry_ids: list[str]) -> list[KlineEvent]:
        """Candles of waiting keys (or of keys seen for the first time: they start waiting now)
        are held; the others are returned, to be applied at once. A batch handed over again
        (a retry) holds nothing twice."""
        if not self.warms_up:
            return events
        ready = []
        for e, entry_id in zip(events, entry_ids):
            key = (e.symbol, e.interval)
            if self.waiting.add(key, entry_id, e):
                continue
            if self.needs_history(key):
                self.waiting.open(key, entry_id, e)
            else:
                ready.append(e)
        return ready

    def apply(self, events: list[KlineEvent], computed_at: int) -> Applied:
        """Apply candles in order; see ``applying``."""
        return applying.apply(self.engine, events, computed_at, self.origins)

    def first_candles(self, events: Iterable[KlineEvent]) -> dict[Key, int]:
        """Keys of ``events`` that want their history read before they are applied, with the
        open time of their first candle (history is read before it)."""
        first: dict[Key, int] = {}
        for e in events:
            key = (e.symbol, e.interval)
            if key not in first and self.needs_history(key):
                first[key] = e.open_time
        return first

    def warm(self, key: Key, cols: tuple) -> int:
        """Feed a key's history (open_time, o, h, l, c, v); returns candles fed (0: none, or the
        key has state already). Raises ``InvalidKline`` for unusable history, after resetting
        the key and marking it cold: bad history must not turn every live candle into a dead
        letter."""
        if not len(cols[0]) or self.engine.last_open_time(key) is not None:
            return 0
        try:
            fed = self.engine.warmup(key, *cols)
        except Exception:
            self.reset(key)
            self.cold.add(key)
            raise
        # The key had no state, so the engine folded every history candle from the first.
        self.origins[key] = int(cols[0][0])
        return fed

    def reset(self, key: Key) -> None:
        self.engine.reset(key)
        self.origins.pop(key, None)

    def warmed(self, key: Key) -> None:
        """The key's warm-up is over; with no history at all, it warms up live."""
        if self.engine.last_open_time(key) is None:
            self.cold.add(key)

    # --- the waiting room's release -------------------------------------------------------

    def release(self, keys: list[Key], computed_at: int) -> Applied:
        """Apply the held candles of warmed keys. They stay in the waiting room (the checkpoint
        does not pass them) until ``released``: the caller publishes them first."""
        return self.apply(self.waiting.candles(keys), computed_at)

    def released(self, keys: list[Key]) -> None:
        self.waiting.leave(keys)

    # --- checkpoint ----------------------------------------------------------------------

    def handled(self, entry_id: str) -> None:
        self.last_entry = max(self.last_entry, entry_id, key=position.id_key)

    def checkpoint_entry(self) -> str:
        return position.before_oldest_waiting(self.last_entry, self.waiting.oldest_ids())

    def snapshot(self) -> position.Checkpoint:
        return position.Checkpoint(self.engine.snapshot(), self.checkpoint_entry(), dict(self.origins))

    def forget(self) -> None:
        """Drop everything of the last ownership (a standby taking over: whatever it held is stale)."""
        self.waiting.clear()
        for key in self.engine.keys():
            self.engine.reset(key)
        self.origins.clear()
        self.last_entry = "0-0"

    def restore(self, saved: position.Checkpoint | None, waiting: Mapping[Key, str]) -> None:
        """Start from a checkpoint (or nothing), with the keys recorded as waiting and their first
        entry ids; the caller then replays the entries after ``last_entry``."""
        self.forget()
        if saved is not None:
            try:
                self.engine.restore(saved.snapshot)
                self.last_entry = saved.entry_id
            except SnapshotMismatch as exc:
                log.warning("discarding indicator checkpoint (%s); rebuilding from history", exc)
            else:
                self._restore_origins(saved.origins)
        for key in waiting:  # see the module docstring
            self.reset(key)
        # The checkpoint never passes them; this also holds for one written by an older build.
        self.last_entry = position.before_oldest_waiting(self.last_entry, waiting.values())


    def _restore_origins(self, saved: Mapping[Key, int | None] | None) -> None:
        keys = [k for k in self.engine.keys() if self.engine.last_open_time(k) is not None]
        self.origins = {k: (saved or {}).get(k) for k in keys}
        unknown = sum(1 for v in self.origins.values() if v is None)
        if unknown:
            # Once per restore, not per event: these keys publish feature_origin null until their
            # state is rebuilt (a gap under the reset policy, a checkpoint that cannot be used).
            log.warning("the indicator checkpoint records no feature origin for %d of %d keys (written before "
                        "origins were recorded): their features.v1 events carry feature_origin null, and "
                        "inference serves models with cumulative features unchecked for them", unknown, len(keys))
