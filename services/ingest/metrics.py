"""The ingest service's metrics (see docs/ingest.md for what each one means)."""

from __future__ import annotations

from libs.common.telemetry import ServiceMetrics


class IngestMetrics:
    def __init__(self, m: ServiceMetrics) -> None:
        self.duplicates = m.duplicates
        self.events_out = m.events_out
        self.ws_messages = m.counter("ws_messages_total", "Websocket messages received, by kind", ["kind"])
        self.published = m.counter("candles_published_total", "Closed candles appended to klines.v1", ["source"])
        self.gaps = m.counter("gaps_total", "Gaps found and backfilled, by what revealed them", ["reason"])
        self.backfilled = m.counter("backfilled_candles_total", "Candles published from REST backfill", ["interval"])
        self.backfill_seconds = m.histogram(
            "backfill_seconds", "Time to fetch and publish one backfill", ["interval"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.backfill_failures = m.counter("backfill_failures_total", "Backfills that failed and were retried", ["interval"])
        self.rest_requests = m.counter("rest_requests_total", "REST requests to the exchange, by HTTP status", ["status"])
        self.rest_used_weight = m.gauge("rest_used_weight", "Last X-MBX-USED-WEIGHT-1M reported by the exchange")
        self.rest_throttled = m.counter("rest_throttled_total", "429/418 answers (all REST paused for Retry-After)")
        self.ws_connections = m.gauge("ws_connections", "Open websocket connections")
        self.ws_connects = m.counter("ws_connects_total", "Websocket connections opened, by reason", ["reason"])
        self.ws_disconnects = m.counter("ws_disconnects_total", "Websocket connections ended, by cause", ["cause"])
        self.receive_to_publish = m.histogram(
            "receive_to_publish_seconds", "From a closed candle's websocket message to its klines.v1 append",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
        )
        self.publish_batch = m.histogram(
            "publish_batch_candles", "Candles per publish call to klines.v1 (a burst of closes shares calls)",
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000),
        )
        self.publish_retries = m.counter(
            "publish_retries_total", "Publish calls to klines.v1 retried because Redis refused them, by error", ["error"]
        )
        self.publish_stalled = m.gauge("publish_stalled", "1 while Redis refuses publishes to klines.v1 (waited out)")
        self.held_candles = m.gauge(
            "held_candles", "Closed candles kept in memory after a failed publish, waiting for their retry"
        )
