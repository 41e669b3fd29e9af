"""Windows from the klines archive when ``features.v1`` holds too little of a stream.

On a first deployment (or a stream that is new to features.v1) a model would otherwise wait
``lookback`` live candles before its first forecast. Instead, the stream's candles before its
first live one are read from the Parquet archive and run through the shared indicator library
in batch, from the archive's first candle, with the feature set the stream carries: the same
values the features service computed when it warmed that stream up from the same archive
(features ``warmup_source=archive``, ``warmup_candles=0``; batch == streaming is the indicator
library's contract). So the first forecast equals the one an uninterrupted service would have
made.

The read and the computation run in a thread, per stream, a few streams at a time; the
stream's live events wait in a buffer meanwhile (other streams are not held), then go through
the engine in order. An archive that cannot be read is one error line and a counted failure:
that stream warms up live, as before.

After a restart the windows come back from features.v1 first; a stream still short of its
models' lookback is filled the same way at its first live candle (archive rows go in front of
the rows it holds, ``Windows.refill``).

A stream whose partition goes to another replica is forgotten here too (``forget``), after its
buffered events reached the engine (``settle``): taken again later, it may be filled again.

Domain code: no bus. ``Backfill`` is given the engine and an archive root.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from libs.common.archive import is_permanent, read_archive
from libs.common.contracts import FeaturesEvent
from libs.common.klines import interval_ms
from libs.indicators.batch import OHLCV, compute_frame
from libs.indicators.feature_sets import get_feature_set

log = logging.getLogger("klinebus.inference")

Key = tuple[str, str]
Row = tuple[int, float, str, dict[str, float]]
# Streams read from the archive at once (files or object storage; each read is one thread).
CONCURRENCY = 4
# A transient read error (network, throttling) is tried again this many times in all; a permanent
# one (corrupt file, 403: libs.common.archive.is_permanent) is given up at once.
ATTEMPTS = 3
RETRY_S = 0.5


def archive_rows(root: str, symbol: str, interval: str, feature_set: str, before: int, keep: int) -> list[Row]:
    """The last ``keep`` candles of a stream before ``before`` (open_time), oldest first, as
    ``(open_time, close, feature_set, values)``; ``values`` empty for a candle not warm yet, as
    the features service publishes it. Features are computed over the whole archived history."""
    frame = read_archive(root, symbol, interval, None, before - 1)
    if frame.empty or keep <= 0:
        return []
    fs = get_feature_set(feature_set)
    # allow_gaps: the features service computes across missing candles (gap_policy=continue).
    feats = compute_frame(frame[["open_time", *OHLCV]], fs.features, interval_ms=interval_ms(interval),
                          allow_gaps=True).tail(keep)
    closes = frame["close"].to_numpy()[-len(feats):]
    out: list[Row] = []
    for i, (open_time, *values) in enumerate(feats.itertuples(index=False, name=None)):
        row = dict(zip(fs.features, (float(v) for v in values)))
        warm = all(math.isfinite(v) for v in row.values())
        out.append((int(open_time), float(closes[i]), fs.id, row if warm else {}))
    return out


@dataclass
class _Pending:
    live: list[FeaturesEvent] = field(default_factory=list)  # delivered while the archive is read
    task: asyncio.Task | None = None


class Backfill:
    """Per stream, once per process: fill the window's older rows from the archive before the
    stream's events reach the engine."""

    def __init__(self, engine: Any, root: str, filled: Any = None, failed: Any = None) -> None:
        self.engine = engine
        self.root = root
        self.filled, self.failed = filled, failed  # counters labelled by interval (optional)
        self.pending: dict[Key, _Pending] = {}
        self.tried: set[Key] = set()
        self._limit = asyncio.Semaphore(CONCURRENCY)

    def _needed(self, key: Key) -> int:
        """Rows the models serving ``key`` need beyond what its window holds (0: none)."""
        need = max((m.spec.lookback for m in self.engine.router.route(*key) if m.spec.feature_set), default=0)
        return max(0, need - self.engine.windows.held(key))

    def take(self, ev: FeaturesEvent) -> bool:
        """True when the event waits for its stream's archive read (it is handed to the engine
        then); False: hand it to the engine now."""
        key = (ev.symbol, ev.interval)
        p = self.pending.get(key)
        if p is not None:
            p.live.append(ev)
            return True
        if key in self.tried or not ev.feature_set or not self._needed(key):
            return False
        self._start(key, _Pending(live=[ev]))
        return True

    def _start(self, key: Key, p: _Pending) -> None:
        self.pending[key] = p
        p.task = asyncio.get_running_loop().create_task(self._run(key), name=f"backfill-{key[0]}-{key[1]}")

    async def _run(self, key: Key) -> None:
        p = self.pending[key]
        first = p.live[0]
        rows: list[Row] = []
        async with self._limit:
            for attempt in range(1, ATTEMPTS + 1):
                try:
                    rows = await asyncio.to_thread(archive_rows, self.root, key[0], key[1], first.feature_set,
                                                   first.open_time, self.engine.windows.capacity)
                    break
                except Exception as exc:  # noqa: BLE001 - the stream warms up live instead; said once
                    if attempt < ATTEMPTS and not is_permanent(exc):
                        await asyncio.sleep(RETRY_S * attempt)
                        continue
                    if self.failed is not None:
                        self.failed.labels(key[1]).inc()
                    log.error("%s %s: windows not filled from the archive at %s (%s: %s); warming up live",
                              key[0], key[1], self.root, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                    break
        # From here to the end nothing awaits: the stream's events reach the engine in order, and
        # events delivered meanwhile are still buffered in ``p.live``.
        self.pending.pop(key, None)
        self.tried.add(key)
        if rows:
            self.engine.windows.refill(key, rows)
            if self.filled is not None:
                self.filled.labels(key[1]).inc(len(rows))
            log.info("%s %s: window filled with %d candles from the archive (up to %d)",
                     key[0], key[1], len(rows), rows[-1][0])
        for ev in p.live:
            self.engine.on_features(ev)

    async def settle(self, belongs: Callable[[Key], bool], timeout: float) -> bool:
        """Let the reads of the selected streams finish, so the events they hold reach the engine."""
        tasks = [p.task for k, p in self.pending.items() if belongs(k) and p.task is not None]
        if not tasks:
            return True
        _, rest = await asyncio.wait(tasks, timeout=timeout)
        return not rest

    def forget(self, belongs: Callable[[Key], bool]) -> None:
        """Drop the selected streams: reads still running are cancelled with the events they hold
        (the partition's next owner reads those events back from features.v1)."""
        for key in [k for k in self.pending if belongs(k)]:
            p = self.pending.pop(key)
            if p.task is not None:
                p.task.cancel()
        self.tried = {k for k in self.tried if not belongs(k)}

    async def drain(self, timeout: float) -> bool:
        """Let reads in flight finish (their streams' buffered events then reach the engine)."""
        tasks = [p.task for p in self.pending.values() if p.task is not None]
        if not tasks:
            return True
        done, rest = await asyncio.wait(tasks, timeout=timeout)
        for t in rest:
            t.cancel()
        return not rest
