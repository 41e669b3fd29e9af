"""The features service as a component: an explicit lifecycle around the domain state machine
(``state.FeaturesState``), reaching the outside only through its port (``port.FeaturesPort``).

Lifecycle, each step called by the bus edge (``app``):

* ``start``: compile the kernels (before consuming: done inside the first batch it blocked the
  event loop for seconds, long enough to lose the ownership lease);
* ``become_owner``: restore the checkpoint, replay what came after it;
* ``on_batch``: one ordered batch of klines.v1;
* ``run_releases``: the background loop that releases the keys whose warm-up is over;
* ``lose_ownership``: drop what the last ownership held (a standby taking over, a stop);
* ``release``: the partition is given up cleanly (a rebalance): its checkpoint, then its state dropped;
* ``stop``: the final checkpoint.

One component per partition of klines.v1 (``app``): each has its own state, checkpoint and
waiting records in that partition's slot, and is owned, restored and released on its own.

One writer of the state at a time (a batch, a release or a restore): ``_lock``.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from libs.common import topics
from libs.common.archive import is_permanent
from libs.common.bus.failures import INFRASTRUCTURE, Stall, classify
from libs.common.contracts import KlineEvent
from libs.common.klines import InvalidKline, now_ms
from libs.common.telemetry import ServiceMetrics
from libs.indicators.streaming import PARALLEL_MIN_ROWS, StreamingEngine
from services.features.applying import Applied
from services.features.port import FeaturesPort
from services.features.state import FeaturesState
from services.features.waiting import Key

log = logging.getLogger("klinebus.features")

# A key's history is read at most this many keys at a time (archive files, object storage).
WARMUP_CONCURRENCY = 8
# A history read that keeps failing (an object store answering 403, a missing bucket) is tried this
# many times, then the key warms up live: a permanent error never holds the stream.
WARMUP_ATTEMPTS = 3
WARMUP_RETRY_S = 0.5


class FeaturesComponent:
    def __init__(self, state: FeaturesState, port: FeaturesPort, metrics: ServiceMetrics, *,
                 checkpoint_every_s: float, family: list["FeaturesComponent"] | None = None) -> None:
        self.state = state
        self.port = port
        self.metrics = metrics
        self.checkpoint_every_s = checkpoint_every_s
        self.restored = False  # this replica owns the groups and has rebuilt its state
        self._lock = asyncio.Lock()
        self._in_flight = False  # a batch applied but not yet published: no checkpoint now
        self._since_checkpoint = 0
        self._checkpointed_at = time.monotonic()
        self._warming: dict[Key, asyncio.Task] = {}
        self._warmed: asyncio.Queue[Key] = asyncio.Queue()
        self._limit = asyncio.Semaphore(WARMUP_CONCURRENCY)
        self._gaps = metrics.counter("gaps_total", "Candles that opened more than one interval after the previous one",
                                     ["interval"])
        self._warmed_candles = metrics.counter("warmup_candles_total", "Archived candles fed to warm indicators up",
                                               ["interval"])
        self._warmup_failures = metrics.counter("warmup_failures_total",
                                                "Keys whose history could not be used to warm up", ["interval"])
        # Read at scrape time, summed over the service's partitions (one gauge, one function).
        family = family if family is not None else []
        family.append(self)
        metrics.gauge("keys", "(symbol, interval) streams with indicator state").set_function(
            lambda: sum(len(c.state.origins) for c in family))
        metrics.gauge("keys_warming", "(symbol, interval) streams whose candles wait for their warm-up").set_function(
            lambda: sum(len(c.state.waiting) for c in family))

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        engine = self.state.engine
        await asyncio.to_thread(compile_kernels, engine.feature_set.id, engine.gap_policy)

    async def become_owner(self) -> None:
        """The snapshot, then every entry after it up to what the group was handed, in stream
        order. Idempotent: re-run whole after an infrastructure failure."""
        async with self._lock:
            self.lose_ownership()
            waiting = await self.port.load_waiting()
            self.state.restore(await self.port.load_checkpoint(), waiting)
            replayed = republished = 0
            async for chunk in self.port.entries_after(self.state.last_entry):
                events = [e for _, e, _ in chunk]
                await self._warm_first_candles(events)
                applied = self.state.apply(events, now_ms())
                # A pending entry may or may not have been published before the restart: publish
                # it (the guard refuses it if it was); so is an acknowledged one whose key was
                # waiting for its warm-up. Any other acknowledged one was published: it only
                # feeds the state.
                republished += await self.port.publish([
                    ev for ev, (_, e, pending) in zip(applied.fresh, chunk)
                    if ev is not None and (pending or (e.symbol, e.interval) in waiting)
                ])
                # A waiting key's candles were never judged in public: its rejected ones are
                # dead letters now (a pending entry is judged again when the bus hands it over).
                for e, why in applied.rejected:
                    if (e.symbol, e.interval) in waiting:
                        await self.port.dead_letter(e, why)
                self.state.last_entry = chunk[-1][0]
                replayed += len(chunk)
            await self.port.release_waiting(list(waiting))
            log.info("indicator state restored: %d keys, %d candles replayed, %d published on the way",
                     len(self.state.engine.keys()), replayed, republished)
            self.restored = True

    def lose_ownership(self) -> None:
        """Whatever this replica held is stale now: warm-ups stop, their candles wait for the
        next owner's replay (the checkpoint never passed them)."""
        self.restored = False
        for task in self._warming.values():
            task.cancel()
        self._warming.clear()
        self.state.waiting.clear()
        while not self._warmed.empty():
            self._warmed.get_nowait()

    async def on_batch(self, events: list[KlineEvent], entry_ids: list[str]) -> None:
        self.metrics.events_in.labels(topics.KLINES).inc(len(events))
        async with self._lock:
            self._in_flight = True
            with self.metrics.handle_seconds.labels(topics.KLINES).time():
                ready = self.state.admit(events, entry_ids)
                new = self.state.waiting.unrecorded()
                if new:
                    # Before the batch is acknowledged: a restart must know to publish them.
                    await self.port.record_waiting(new)
                    self.state.waiting.recorded(new)
                    for key in new:
                        if key not in self._warming:
                            self._warming[key] = asyncio.create_task(
                                self._warm_in_background(key, self.state.waiting.first(key).open_time),
                                name=f"warm {key}")
                await self._send(self.state.apply(ready, now_ms()))
            self._in_flight = False
        self.state.handled(entry_ids[-1])
        self._since_checkpoint += len(events)
        if time.monotonic() - self._checkpointed_at >= self.checkpoint_every_s:
            await self.write_checkpoint()

    async def run_releases(self) -> None:
        """Applies and publishes the candles that waited for their keys' warm-up, every key
        warmed since the last round in one batch. Redis trouble is waited out here (the candles
        are acknowledged already); anything else fails the service, and the restart's replay
        publishes them (see ``state``: a restore drops what a snapshot holds of waiting keys)."""
        stall = Stall("features:warm-up release")
        while True:
            keys = [await self._warmed.get()]
            while not self._warmed.empty():
                keys.append(self._warmed.get_nowait())
            async with self._lock:
                keys = [k for k in keys if k in self.state.waiting]
                applied = self.state.release(keys, now_ms())
                await _until_done(stall, "publishing warmed-up keys", lambda: self._send(applied))
                await _until_done(stall, "recording warmed-up keys", lambda: self.port.release_waiting(keys))
                stall.clear()
                self.state.released(keys)
                for key in keys:
                    self._warming.pop(key, None)

    async def release(self) -> None:
        """The partition is given up cleanly, after its last batch was acknowledged: a checkpoint
        the next owner starts from, then nothing of it is kept (it is that owner's now)."""
        async with self._lock:
            if self.restored and not self._in_flight:
                await self.write_checkpoint()
            self.lose_ownership()
            self.state.forget()

    async def stop(self) -> None:
        was_owner = self.restored
        for task in self._warming.values():  # their candles wait for the replay after the restart
            task.cancel()
        # Only the owner, and not while a batch is applied but not yet published: the previous
        # checkpoint plus the replay rebuilds the state without it, and it is handled again.
        if was_owner and self._since_checkpoint and not self._in_flight:
            await self.write_checkpoint()

    async def write_checkpoint(self) -> None:
        await self.port.save_checkpoint(self.state.snapshot())
        self._since_checkpoint = 0
        self._checkpointed_at = time.monotonic()

    # --- a batch's results -------------------------------------------------------------------

    async def _send(self, applied: Applied) -> None:
        """Publish first: a failed call keeps its events in the port, and the retry (whose
        candles are duplicates for the state by then) sends them first. The letters are written
        after, and removed as they are written."""
        for e, late in applied.gaps:
            self._gaps.labels(e.interval).inc()
            log.warning("%s %s: candle %d opened %d ms late (an exchange outage, or ingest could not backfill)",
                        e.symbol, e.interval, e.open_time, late)
        applied.gaps = []
        if applied.duplicates:
            self.metrics.duplicates.labels(topics.KLINES).inc(applied.duplicates)
            applied.duplicates = 0
        publish, applied.fresh = applied.publish, []  # a failed call keeps them in the port
        await self.port.publish(publish)
        while applied.rejected:
            await self.port.dead_letter(*applied.rejected[0])
            applied.rejected.pop(0)

    # --- warm-up ---------------------------------------------------------------------------

    async def _warm_first_candles(self, events: list[KlineEvent]) -> None:
        """Keys seen for the first time warm up from their history together (reads concurrent),
        before the candles are applied."""
        first = self.state.first_candles(events)
        if first:
            await asyncio.gather(*(self._warm_one(k, t) for k, t in first.items()))

    async def _warm_in_background(self, key: Key, before: int) -> None:
        await self._warm_one(key, before)
        self.state.warmed(key)
        await self._warmed.put(key)

    async def _warm_one(self, key: Key, before: int) -> None:
        symbol, interval = key
        async with self._limit:
            try:
                cols = await self._history_of(symbol, interval, before)
            except Exception as exc:  # noqa: BLE001 - see WARMUP_ATTEMPTS
                self.state.cold.add(key)
                self._warmup_failures.labels(interval).inc()
                log.error("%s %s: history unreadable for warm-up (%s); warming up live", symbol, interval, exc)
                return
        try:
            fed = self.state.warm(key, cols)
        except InvalidKline as exc:
            self._warmup_failures.labels(interval).inc()
            log.error("%s %s: history unusable for warm-up (%s); warming up live", symbol, interval, exc)
            return
        if fed:
            self._warmed_candles.labels(interval).inc(fed)
            log.info("%s %s warmed up from %d earlier candles", symbol, interval, fed)

    async def _history_of(self, symbol: str, interval: str, before: int) -> tuple:
        for attempt in range(1, WARMUP_ATTEMPTS + 1):
            try:
                return await self.port.history(symbol, interval, before)
            except Exception as exc:  # noqa: BLE001 - bounded: the key warms up live after the last try
                # A permanent error (an object-store 403, a corrupt file) will not heal by waiting.
                if attempt == WARMUP_ATTEMPTS or is_permanent(exc):
                    raise
                log.warning("%s %s: reading history failed (%s); retrying", symbol, interval, exc)
                await asyncio.sleep(WARMUP_RETRY_S * attempt)
        raise AssertionError("unreachable")


def compile_kernels(feature_set: str, gap_policy: str) -> None:
    """Compile (or load from numba's cache) every kernel path a batch or a warm-up takes."""
    engine = StreamingEngine(feature_set, gap_policy=gap_policy)  # type: ignore[arg-type]
    n = 2 * PARALLEL_MIN_ROWS  # both the one-lane and the two-lane paths
    keys = [(f"C{i % PARALLEL_MIN_ROWS}", "1m") for i in range(n)]
    open_time = np.array([(i // PARALLEL_MIN_ROWS) * 60_000 for i in range(n)], dtype=np.int64)
    price = np.full(n, 100.0)
    engine.update_many(keys, open_time, price, price + 1, price - 1, price, price)
    two = np.array([0, 60_000], dtype=np.int64)
    engine.warmup(("WARMUP", "1m"), two, price[:2], price[:2] + 1, price[:2] - 1, price[:2], price[:2])


async def _until_done(stall: Stall, doing: str, call) -> None:
    """Run ``call`` until it succeeds, waiting out infrastructure failures; anything else is raised."""
    while True:
        try:
            await call()
            return
        except Exception as exc:  # noqa: BLE001 - classified
            if classify(exc) != INFRASTRUCTURE:
                raise
            await stall.wait(exc, doing)
