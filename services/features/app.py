"""Features service: klines.v1 -> the streaming indicator engine -> features.v1.

One event per closed candle. While a key warms up, its event carries
``warm: false`` and no values; after that every value is a real number.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from faststream.redis.annotations import RedisStreamMessage

from libs.common import topics
from libs.common.bus import redis_client
from libs.common.contracts import FeaturesEvent, KlineEvent
from libs.common.service import ServiceRuntime
from libs.common.settings.features import FeaturesSettings
from services.features import checkpoint
from services.features.streaming import SnapshotMismatch, StreamingEngine

SETTINGS = FeaturesSettings
log = logging.getLogger("klinebus.features")

History = Callable[[str, str, int], tuple] | None


def _history_source(settings: FeaturesSettings, url: str) -> History:
    """``(symbol, interval, before_open_time) -> (open_time, o, h, l, c, v)``: the last
    ``warmup_candles`` candles of a key before a time, from the configured source."""
    if settings.warmup_source == "none" or settings.warmup_candles == 0:
        return None
    if settings.warmup_source == "stream":
        return None  # the stream source is async: see _stream_history
    try:
        from services.ingest.archive import read_archive
    except ImportError:  # features deployed without the ingest extra
        log.warning("archive reader unavailable (install klinebus[ingest]); indicators warm up live")
        return None
    root = getattr(settings, "archive_url", "") or str(settings.data_dir / "archive")
    n = settings.warmup_candles

    def history(symbol: str, interval: str, before: int) -> tuple:
        frame = read_archive(root, symbol, interval, end=before - 1).tail(n)
        return tuple(frame[c].to_numpy() for c in ("open_time", "open", "high", "low", "close", "volume"))

    return history


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
    history = _history_source(settings, url)
    gaps = metrics.counter("gaps_total", "Candles that opened more than one interval after the previous one", ["interval"])
    warmed = metrics.counter("warmup_candles_total", "Archived candles fed to warm indicators up", ["interval"])
    keys_gauge = metrics.gauge("keys", "(symbol, interval) streams with indicator state")
    state = {"since_checkpoint": 0, "last_entry": "0-0", "checkpointed_at": time.monotonic()}
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
            _apply(event)
            state["last_entry"] = entry_id
            replayed += 1
        log.info("indicator state restored: %d keys, %d candles replayed", len(engine.keys()), replayed)
        keys_gauge.set(len(engine.keys()))
        runtime.health.set("state_restored", True)

    def _warm_from_history(event: KlineEvent) -> None:
        key = (event.symbol, event.interval)
        if history is None or engine.last_open_time(key) is not None:
            return
        cols = history(event.symbol, event.interval, event.open_time)
        if len(cols[0]):
            fed = engine.warmup(key, *cols)
            warmed.labels(event.interval).inc(fed)
            log.info("%s %s warmed up from %d archived candles", event.symbol, event.interval, fed)

    def _apply(event: KlineEvent):
        _warm_from_history(event)
        return engine.update(
            (event.symbol, event.interval), event.open_time, event.open, event.high, event.low, event.close, event.volume
        )

    @bus.subscriber(topics.KLINES, description="Compute the feature set for every closed candle.")
    async def on_kline(event: KlineEvent, msg: RedisStreamMessage) -> None:
        metrics.events_in.labels(topics.KLINES).inc()
        with metrics.handle_seconds.labels(topics.KLINES).time():
            update = _apply(event)  # InvalidCandles -> dead letter (bus middleware)
            if not update.applied:
                metrics.duplicates.labels(topics.KLINES).inc()
                return
            if update.gap_ms:
                gaps.labels(event.interval).inc()
                log.warning(
                    "%s %s: candle %d opened %d ms late (an exchange outage, or ingest could not backfill)",
                    event.symbol, event.interval, event.open_time, update.gap_ms,
                )
            appended, _ = await out.publish(
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
            if appended:
                metrics.events_out.labels(topics.FEATURES).inc()
            else:
                metrics.duplicates.labels(topics.FEATURES).inc()
        state["last_entry"] = max(state["last_entry"], msg.raw_message["message_ids"][0].decode(), key=checkpoint.id_key)
        state["since_checkpoint"] += 1
        keys_gauge.set(len(engine.keys()))
        if time.monotonic() - state["checkpointed_at"] >= settings.checkpoint_every_s:
            await write_checkpoint()

    @runtime.on_shutdown
    async def final_checkpoint() -> None:
        if state["since_checkpoint"]:
            await write_checkpoint()
        await client.aclose()

    return runtime
