"""The ingest service: Binance klines (websocket + REST backfill) -> ``klines.v1``, exactly once.

``create(settings, url)`` builds the runtime without touching the network; ``klinebus run
ingest`` starts it. Closed candles go to ``klines.v1`` (once per (symbol, interval,
open_time), in order per stream, gaps backfilled over REST); with ``publish_live`` the
in-progress updates also go to the capped ``klines-live.v1``.
"""

from __future__ import annotations

from libs.common import topics
from libs.common.bus import redis_client
from libs.common.contracts import KlineEvent, LiveKlineEvent
from libs.common.service import ServiceRuntime
from services.ingest.settings import IngestSettings
from services.ingest.engine import IngestEngine
from services.ingest.metrics import IngestMetrics
from services.ingest.rest import RestKlines
from services.ingest.sink import KlineSink
from services.ingest.wsclient import BinanceStreamClient

SETTINGS = IngestSettings

DESCRIPTION = (
    "Binance spot klines from combined websocket streams, gaps backfilled over REST, "
    "published once per (symbol, interval, open_time) in order."
)


def create(settings: IngestSettings, url: str) -> ServiceRuntime:
    runtime = ServiceRuntime("ingest", settings, url, description=DESCRIPTION)
    runtime.bus.publisher(topics.KLINES, KlineEvent)
    runtime.bus.publisher(topics.KLINES_LIVE, LiveKlineEvent)
    metrics = IngestMetrics(runtime.metrics)
    redis = redis_client(url)
    sink = KlineSink(
        redis, settings.stream_maxlen, settings.live_maxlen, metrics=metrics,
        retention_ms=getattr(settings, "stream_retention_ms", 0),  # the bus's time-based retention, where set
        partitions=runtime.bus.partitions,  # each candle to its key's partition of klines.v1
    )
    engine = IngestEngine(
        settings.symbols,
        settings.intervals,
        sink,
        RestKlines(settings.binance_rest_url, settings.rest_weight_budget, metrics),
        metrics,
        runtime.bus.dead_letter,
        publish_live=settings.publish_live,
        initial_backfill=settings.initial_backfill_candles,
    )
    client = BinanceStreamClient(
        settings.binance_ws_url,
        engine.stream_names,
        engine.on_message,
        engine.on_connected,
        streams_per_connection=settings.streams_per_connection,
        rotate_after_s=settings.rotate_after_s,
        silence_timeout_s=settings.silence_timeout_s,
        reconnect_initial_s=settings.reconnect_initial_s,
        reconnect_max_s=settings.reconnect_max_s,
        metrics=metrics,
    )
    runtime.engine = engine  # type: ignore[attr-defined]  # for tests and the demo
    runtime.ws_client = client  # type: ignore[attr-defined]
    runtime.health.set("websocket", lambda: client.open_connections > 0)

    @runtime.on_startup
    async def load_state() -> None:
        await engine.load()

    @runtime.background
    async def trackers() -> None:
        await engine.run_trackers()

    @runtime.background
    async def websocket() -> None:
        await client.run()

    @runtime.on_shutdown
    async def close_clients() -> None:
        await engine.close()
        await sink.close()
        await redis.aclose()

    return runtime
