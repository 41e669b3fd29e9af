"""Features service: klines.v1 -> the streaming indicator engine -> features.v1.

One event per closed candle. While a key warms up, its event carries
``warm: false`` and no values; after that every value is a real number.

Candles arrive in ordered batches (``Bus.ordered_batch``): one ``update_many`` over the batch,
one guarded publish for its events, one acknowledgement. Keys seen for the first time warm up
from their history together before the batch is applied.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

import numpy as np

from libs.common import topics
from libs.common.archive import is_permanent, read_archive
from libs.common.bus import redis_client
from libs.common.bus.failures import INFRASTRUCTURE, Stall, classify
from libs.common.contracts import FeaturesEvent, KlineEvent, Prepared
from libs.common.klines import InvalidKline, now_ms
from libs.common.service import ServiceRuntime
from services.features.settings import FeaturesSettings
from libs.common.stream_history import recent_candles
from services.features import checkpoint
from libs.indicators.kernels import ST_DUPLICATE, ST_INVALID, ST_OK
from libs.indicators.streaming import PARALLEL_MIN_ROWS, SnapshotMismatch, StreamingEngine

SETTINGS = FeaturesSettings
log = logging.getLogger("klinebus.features")

History = Callable[[str, str, int], Awaitable[tuple]] | None
HISTORY_COLUMNS = ("open_time", "open", "high", "low", "close", "volume")


def _history_source(settings: FeaturesSettings, client) -> History:
    """``(symbol, interval, before_open_time) -> (open_time, o, h, l, c, v)``: the last
    ``warmup_candles`` candles of a key before a time, from the configured source."""
    n = settings.warmup_candles or None  # None: all of it
    if settings.warmup_source == "none":
        return None
    if settings.warmup_source == "stream":

        async def from_stream(symbol: str, interval: str, before: int) -> tuple:
            ks = await recent_candles(client, symbol, interval, n, before)
            return tuple(np.array([getattr(k, c) for k in ks]) for c in HISTORY_COLUMNS)

        return from_stream
    root = settings.archive_url or str(settings.data_dir / "archive")

    async def from_archive(symbol: str, interval: str, before: int) -> tuple:
        frame = await asyncio.to_thread(read_archive, root, symbol, interval, None, before - 1)
        frame = frame if n is None else frame.tail(n)
        return tuple(frame[c].to_numpy() for c in HISTORY_COLUMNS)

    return from_archive


# A key's history is read at most this many keys at a time (archive files, object storage).
WARMUP_CONCURRENCY = 8
# A history read that keeps failing (an object store answering 403, a missing bucket) is tried this
# many times, then the key warms up live: a permanent error never holds the stream.
WARMUP_ATTEMPTS = 3
WARMUP_RETRY_S = 0.5
# Rows of the indicator state updated per replay step after a restart.
REPLAY_CHUNK = 1000


def _compile(feature_set: str, gap_policy: str) -> None:
    engine = StreamingEngine(feature_set, gap_policy=gap_policy)  # type: ignore[arg-type]
    n = 2 * PARALLEL_MIN_ROWS  # both the one-lane and the two-lane paths
    keys = [(f"C{i % PARALLEL_MIN_ROWS}", "1m") for i in range(n)]
    open_time = np.array([(i // PARALLEL_MIN_ROWS) * 60_000 for i in range(n)], dtype=np.int64)
    price = np.full(n, 100.0)
    engine.update_many(keys, open_time, price, price + 1, price - 1, price, price)
    two = np.array([0, 60_000], dtype=np.int64)
    engine.warmup(("WARMUP", "1m"), two, price[:2], price[:2] + 1, price[:2] - 1, price[:2], price[:2])


def create(settings: FeaturesSettings, url: str) -> ServiceRuntime:
    runtime = ServiceRuntime(
        "features", settings, url, description="Indicators and candlestick patterns for every closed candle."
    )
    bus, metrics = runtime.bus, runtime.metrics
    bus.publisher(topics.FEATURES, FeaturesEvent)
    client = redis_client(url)
    # A crash between publishing and acknowledging re-delivers the candle; the guard keeps
    # features.v1 at exactly one event per candle anyway.
    out = bus.once_per_candle(topics.FEATURES, client)
    engine = StreamingEngine(settings.feature_set, gap_policy=settings.gap_policy)  # type: ignore[arg-type]
    history = _history_source(settings, client)
    gaps = metrics.counter("gaps_total", "Candles that opened more than one interval after the previous one", ["interval"])
    warmed = metrics.counter("warmup_candles_total", "Archived candles fed to warm indicators up", ["interval"])
    warmup_failures = metrics.counter("warmup_failures_total", "Keys whose history could not be used to warm up", ["interval"])
    # Read at scrape time: the engine already knows its keys.
    metrics.gauge("keys", "(symbol, interval) streams with indicator state").set_function(lambda: len(engine.keys()))
    state = {"since_checkpoint": 0, "last_entry": "0-0", "checkpointed_at": time.monotonic(), "in_flight": False,
             "restored": False}
    runtime.health.set("state_restored", lambda: state["restored"] or not bus.owns_all())
    cold: set[tuple[str, str]] = set()  # keys whose warm-up was given up: they warm up live
    limit = asyncio.Semaphore(WARMUP_CONCURRENCY)
    # Keys warming up off the hot path: their candles wait here, in stream order, while every
    # other key goes on; a warmed key's candles are applied and published by ``release_warmed``.
    # They are acknowledged on arrival, so the checkpoint never passes the oldest one waiting
    # (``_checkpoint_entry``): after a crash the replay applies and publishes them.
    held: dict[tuple[str, str], list[tuple[str, KlineEvent]]] = {}
    warming: dict[tuple[str, str], asyncio.Task] = {}
    warmed_keys: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    # One writer of the engine and the guard at a time: a batch, a release or a restore.
    engine_lock = asyncio.Lock()
    metrics.gauge("keys_warming", "(symbol, interval) streams whose candles wait for their warm-up").set_function(
        lambda: len(held))

    def _checkpoint_entry() -> str:
        return checkpoint.before_oldest_waiting(state["last_entry"], (waiting[0][0] for waiting in held.values()))

    async def write_checkpoint() -> None:
        await checkpoint.save(client, engine.snapshot(), _checkpoint_entry())
        state["since_checkpoint"] = 0
        state["checkpointed_at"] = time.monotonic()

    @runtime.on_startup
    async def compile_kernels() -> None:
        """Compile (or load from numba's cache) the kernels before consuming: done inside the
        first batch it blocked the event loop for seconds, long enough to lose the ownership lease."""
        await asyncio.to_thread(_compile, settings.feature_set, settings.gap_policy)

    @bus.on_owner
    async def restore_state() -> None:
        """Runs when this replica becomes the owner (at start, or a standby taking over): the
        snapshot, then every entry after it up to what the group was handed, in stream order."""
        async with engine_lock:
            await _restore()

    async def _restore() -> None:
        state["restored"] = False
        for task in warming.values():  # a standby taking over: whatever it held is stale
            task.cancel()
        warming.clear()
        held.clear()
        while not warmed_keys.empty():
            warmed_keys.get_nowait()
        for key in engine.keys():
            engine.reset(key)
        waiting = await checkpoint.load_waiting(client)
        state["last_entry"] = "0-0"
        saved = await checkpoint.load(client)
        if saved is not None:
            try:
                engine.restore(saved.snapshot)
                state["last_entry"] = saved.entry_id
            except SnapshotMismatch as exc:
                log.warning("discarding indicator checkpoint (%s); rebuilding from history", exc)
        # The checkpoint never passes them; this also holds for one written by an older build.
        state["last_entry"] = checkpoint.before_oldest_waiting(state["last_entry"], waiting.values())
        replayed = republished = 0
        async for chunk in checkpoint.entries_after(client, bus.service, state["last_entry"], REPLAY_CHUNK):
            events = [e for _, e, _ in chunk]
            fresh, _ = await _apply(events)
            # A pending entry may or may not have been published before the restart: publish it
            # (the guard refuses it if it was); so is an acknowledged one whose key was waiting
            # for its warm-up. Any other acknowledged one was published: it only feeds the state.
            republished += await out.publish_all([
                ev for ev, (_, e, pending) in zip(fresh, chunk)
                if ev is not None and (pending or (e.symbol, e.interval) in waiting)
            ])
            state["last_entry"] = chunk[-1][0]
            replayed += len(chunk)
        await checkpoint.release_waiting(client, list(waiting))
        log.info("indicator state restored: %d keys, %d candles replayed, %d published on the way",
                 len(engine.keys()), replayed, republished)
        state["restored"] = True

    async def _history_of(symbol: str, interval: str, before: int):
        assert history is not None
        for attempt in range(1, WARMUP_ATTEMPTS + 1):
            try:
                return await history(symbol, interval, before)
            except Exception as exc:  # noqa: BLE001 - bounded: the key warms up live after the last try
                # A permanent error (an object-store 403, a corrupt file) will not heal by waiting.
                if attempt == WARMUP_ATTEMPTS or is_permanent(exc):
                    raise
                log.warning("%s %s: reading history failed (%s); retrying", symbol, interval, exc)
                await asyncio.sleep(WARMUP_RETRY_S * attempt)

    async def _warm_one(key: tuple[str, str], before: int) -> None:
        symbol, interval = key
        async with limit:
            try:
                cols = await _history_of(symbol, interval, before)
            except Exception as exc:  # noqa: BLE001 - see WARMUP_ATTEMPTS
                cold.add(key)
                warmup_failures.labels(interval).inc()
                log.error("%s %s: history unreadable for warm-up (%s); warming up live", symbol, interval, exc)
                return
        if not len(cols[0]) or engine.last_open_time(key) is not None:
            return
        try:
            fed = engine.warmup(key, *cols)
        except InvalidKline as exc:
            # Bad history must not turn every live candle of the key into a dead letter: say so
            # once and warm up live instead.
            engine.reset(key)
            cold.add(key)
            warmup_failures.labels(interval).inc()
            log.error("%s %s: history unusable for warm-up (%s); warming up live", symbol, interval, exc)
            return
        warmed.labels(interval).inc(fed)
        log.info("%s %s warmed up from %d earlier candles", symbol, interval, fed)

    async def _warm_new_keys(events) -> None:
        """Keys seen for the first time warm up from their history together (reads concurrent,
        off the event loop), before the batch is applied: one new symbol costs one history read,
        not a stall of every other key behind it."""
        if history is None:
            return
        first: dict[tuple[str, str], int] = {}
        for e in events:
            key = (e.symbol, e.interval)
            if key not in first and key not in cold and engine.last_open_time(key) is None:
                first[key] = e.open_time
        if first:
            await asyncio.gather(*(_warm_one(k, t) for k, t in first.items()))

    async def _apply(events) -> tuple[list[Prepared | None], list[tuple[int, str]]]:
        """Apply candles to the state, in order. Returns the event to publish per candle (None for
        a duplicate or an invalid one) and the invalid ones with their reasons."""
        await _warm_new_keys(events)
        n = len(events)
        keys = [(e.symbol, e.interval) for e in events]
        # One conversion for the batch (float64 holds ms timestamps exactly up to 2**53).
        cols = np.array([(e.open_time, e.open, e.high, e.low, e.close, e.volume) for e in events], dtype=np.float64).T
        result = engine.update_many(keys, cols[0].astype(np.int64), cols[1], cols[2], cols[3], cols[4], cols[5])
        fresh: list[Prepared | None] = [None] * n
        invalid: list[tuple[int, str]] = []
        names = result.names
        status = result.status.tolist()
        finite = np.isfinite(result.values[result.status == ST_OK])
        if not finite.all():  # the contract: never NaN (checked per batch, not per value)
            bad = [names[j] for j in np.flatnonzero(~finite.all(axis=0))]
            raise ValueError(f"indicator engine returned non-finite values for {', '.join(bad)}")
        rows = result.values.tolist()  # one conversion, not one per event
        feature_set_id = engine.feature_set.id
        computed_at = now_ms()
        for i, e in enumerate(events):
            st = status[i]
            if st == ST_INVALID:
                reason = result.reasons[i].split(": ", 1)[-1]
                invalid.append((i, f"{e.symbol} {e.interval} open_time={e.open_time}: {reason}"))
                continue
            if st == ST_DUPLICATE:
                continue
            gap = int(result.gap_ms[i])
            if gap:
                gaps.labels(e.interval).inc()
                log.warning(
                    "%s %s: candle %d opened %d ms late (an exchange outage, or ingest could not backfill)",
                    e.symbol, e.interval, e.open_time, gap,
                )
            values = dict(zip(names, rows[i])) if st == ST_OK else {}
            fresh[i] = FeaturesEvent.prepared(
                e.symbol, e.interval, e.open_time, e.close, feature_set_id, values, st == ST_OK, e.ingested_at,
                computed_at,
            )
        return fresh, invalid

    async def _apply_batch(events: list[KlineEvent]) -> tuple[list[Prepared], list[tuple[bytes, str]]]:
        """Apply candles; returns the events to publish and the dead letters to write."""
        if not events:
            return [], []
        fresh, invalid = await _apply(events)
        publish = [e for e in fresh if e is not None]
        duplicates = len(events) - len(publish) - len(invalid)
        if duplicates:
            metrics.duplicates.labels(topics.KLINES).inc(duplicates)
        return publish, [(events[i].to_json(), reason) for i, reason in invalid]

    async def _send(publish: list[Prepared], letters: list[tuple[bytes, str]]) -> None:
        # Publish first: a failed call keeps its events in the guard's outbox, and the retry of
        # the batch (whose candles are duplicates for the state by then) sends them first. The
        # letters are written after, and removed from the list as they are written.
        await out.publish_all(publish)
        while letters:
            await bus.dead_letter(topics.KLINES, *letters[0])
            letters.pop(0)

    async def _hold_new_keys(events: list[KlineEvent], entry_ids: list[str]) -> list[KlineEvent]:
        """Candles of keys warming up (or seen for the first time: their warm-up starts now)
        wait in ``held``; the others are returned, to be applied at once. New keys are recorded
        in Redis before the batch is acknowledged, so a restart knows to publish them."""
        if history is None:
            return events
        ready = []
        new: dict[tuple[str, str], str] = {}
        for e, entry_id in zip(events, entry_ids):
            key = (e.symbol, e.interval)
            waiting = held.get(key)
            if waiting is not None:
                waiting.append((entry_id, e))
            elif key not in cold and engine.last_open_time(key) is None:
                held[key] = [(entry_id, e)]
                new[key] = entry_id
            else:
                ready.append(e)
        if new:
            await checkpoint.record_waiting(client, new)
            for key in new:
                warming[key] = asyncio.create_task(_warm_in_background(key, held[key][0][1].open_time),
                                                   name=f"warm {key}")
        return ready

    async def _warm_in_background(key: tuple[str, str], before: int) -> None:
        await _warm_one(key, before)
        if engine.last_open_time(key) is None:
            cold.add(key)  # no history to warm from: it warms up live, never read again
        await warmed_keys.put(key)

    @runtime.background
    async def release_warmed() -> None:
        """Applies and publishes the candles that waited for their keys' warm-up, every key
        warmed since the last round in one batch. Redis trouble is waited out here (the candles
        are acknowledged already); anything else fails the service, and the restart's replay
        publishes them (the checkpoint stops before them)."""
        stall = Stall("features:warm-up release")
        while True:
            keys = [await warmed_keys.get()]
            while not warmed_keys.empty():
                keys.append(warmed_keys.get_nowait())
            async with engine_lock:
                publish, letters = await _apply_batch([e for key in keys if key in held for _, e in held[key]])
                while True:
                    try:
                        await _send(publish, letters)
                        break
                    except Exception as exc:  # noqa: BLE001 - classified
                        if classify(exc) != INFRASTRUCTURE:
                            raise
                        await stall.wait(exc, "publishing warmed-up keys")
                        publish = []  # the guard's outbox holds them
                while True:
                    try:
                        await checkpoint.release_waiting(client, keys)
                        break
                    except Exception as exc:  # noqa: BLE001 - classified
                        if classify(exc) != INFRASTRUCTURE:
                            raise
                        await stall.wait(exc, "recording warmed-up keys")
                stall.clear()
                for key in keys:
                    held.pop(key, None)
                    warming.pop(key, None)

    @bus.ordered_batch(topics.KLINES, KlineEvent, description="Compute the feature set for every closed candle.")
    async def on_klines(events: list[KlineEvent], entry_ids: list[str]) -> None:
        metrics.events_in.labels(topics.KLINES).inc(len(events))
        async with engine_lock:
            state["in_flight"] = True
            with metrics.handle_seconds.labels(topics.KLINES).time():
                await _send(*await _apply_batch(await _hold_new_keys(events, entry_ids)))
            state["in_flight"] = False
        state["last_entry"] = max(state["last_entry"], entry_ids[-1], key=checkpoint.id_key)
        state["since_checkpoint"] += len(events)
        if time.monotonic() - state["checkpointed_at"] >= settings.checkpoint_every_s:
            await write_checkpoint()

    @runtime.on_shutdown
    async def final_checkpoint() -> None:
        for task in warming.values():  # their candles wait for the replay after the restart
            task.cancel()
        # Only the owner, and not while a batch is applied but not yet published: the previous
        # checkpoint plus the replay rebuilds the state without it, and it is handled again.
        if state["restored"] and state["since_checkpoint"] and not state["in_flight"]:
            await write_checkpoint()
        await client.aclose()

    return runtime
