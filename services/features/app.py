"""Features service: klines.v1 -> the streaming indicator engine -> features.v1.

One event per closed candle. While a key warms up, its event carries
``warm: false`` and no values; after that every value is a real number.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Awaitable, Callable

import numpy as np

from libs.common import topics
from libs.common.archive import read_archive
from libs.common.bus import redis_client
from libs.common.contracts import FeaturesEvent, KlineEvent
from libs.common.klines import InvalidKline
from libs.common.service import ServiceRuntime
from services.features.settings import FeaturesSettings
from libs.common.stream_history import recent_candles
from services.features import checkpoint
from libs.indicators.streaming import SnapshotMismatch, StreamingEngine

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
    state = {"since_checkpoint": 0, "last_entry": "0-0", "checkpointed_at": time.monotonic(), "in_flight": False}
    runtime.health.set("state_restored", False)

    async def write_checkpoint() -> None:
        await checkpoint.save(client, engine.snapshot(), state["last_entry"])
        state["since_checkpoint"] = 0
        state["checkpointed_at"] = time.monotonic()

    @runtime.on_startup
    async def restore_state() -> None:
        saved = await checkpoint.load(client)
        if saved is not None:
            try:
                engine.restore(saved.snapshot)
                state["last_entry"] = saved.entry_id
            except SnapshotMismatch as exc:
                log.warning("discarding indicator checkpoint (%s); rebuilding from history", exc)
        replayed = 0
        async for entry_id, event in checkpoint.acknowledged_after(client, bus.service, state["last_entry"]):
            with contextlib.suppress(InvalidKline):  # dead-lettered when first delivered
                await _apply(event)
            state["last_entry"] = entry_id
            replayed += 1
        log.info("indicator state restored: %d keys, %d candles replayed", len(engine.keys()), replayed)
        runtime.health.set("state_restored", True)

    async def _warm_from_history(event: KlineEvent) -> None:
        key = (event.symbol, event.interval)
        if history is None or engine.last_open_time(key) is not None:
            return
        cols = await history(event.symbol, event.interval, event.open_time)
        if not len(cols[0]):
            return
        try:
            fed = engine.warmup(key, *cols)
        except InvalidKline as exc:
            # Bad history must not turn every live candle of the key into a dead letter: say so
            # once and warm up live instead.
            engine.reset(key)
            warmup_failures.labels(event.interval).inc()
            log.error("%s %s: history unusable for warm-up (%s); warming up live", event.symbol, event.interval, exc)
            return
        warmed.labels(event.interval).inc(fed)
        log.info("%s %s warmed up from %d earlier candles", event.symbol, event.interval, fed)

    async def _apply(event: KlineEvent):
        await _warm_from_history(event)
        return engine.update(
            (event.symbol, event.interval), event.open_time, event.open, event.high, event.low, event.close, event.volume
        )

    @bus.ordered(topics.KLINES, KlineEvent, description="Compute the feature set for every closed candle.")
    async def on_kline(event: KlineEvent, entry_id: str) -> None:
        metrics.events_in.labels(topics.KLINES).inc()
        state["in_flight"] = True
        with metrics.handle_seconds.labels(topics.KLINES).time():
            update = await _apply(event)  # InvalidCandles -> dead letter (bus middleware)
            if not update.applied:
                # A retry after the publish failed (the state holds the candle already) publishes
                # it again; anything else is a re-delivery.
                if not await out.retry_last(event.symbol, event.interval, event.open_time):
                    metrics.duplicates.labels(topics.KLINES).inc()
                state["in_flight"] = False
                return
            if update.gap_ms:
                gaps.labels(event.interval).inc()
                log.warning(
                    "%s %s: candle %d opened %d ms late (an exchange outage, or ingest could not backfill)",
                    event.symbol, event.interval, event.open_time, update.gap_ms,
                )
            await out.publish(
                FeaturesEvent(
                    symbol=event.symbol,
                    interval=event.interval,
                    open_time=event.open_time,
                    close=event.close,
                    feature_set=engine.feature_set.id,
                    values=update.values or {},
                    warm=update.status == "ok",
                    kline_ingested_at=event.ingested_at,
                )
            )
        state["in_flight"] = False
        state["last_entry"] = max(state["last_entry"], entry_id, key=checkpoint.id_key)
        state["since_checkpoint"] += 1
        if time.monotonic() - state["checkpointed_at"] >= settings.checkpoint_every_s:
            await write_checkpoint()

    @runtime.on_shutdown
    async def final_checkpoint() -> None:
        # Not while a candle is applied but not yet published: the previous checkpoint plus the
        # replay of acknowledged entries rebuilds the state without it, and it is handled again.
        if state["since_checkpoint"] and not state["in_flight"]:
            await write_checkpoint()
        await client.aclose()

    return runtime
