"""The system alert rules: one list, each rule with what it means, the first thing to check, and
unit cases (input series that must and must not make it fire) that promtool runs.

Metric sources: ingest (candles, websocket, REST), the bus edge (``klinebus_bus_*``: group lag,
trims, stalls), inference (predictions, live scores), the alerts service's stream watcher
(``klinebus_alerts_stream_*``, ``close_to_publish_seconds``: freshness measured from outside the
producers), every service's ``dead_letters_total`` and the Redis exporter (``redis_*``: memory, AOF,
replication; k8s/components/monitoring runs it).

Every rule is a **system** alert: it carries ``kind: system`` and a ``runbook_url`` into
docs/alerts.md (its section there is generated from this file: meaning, first checks, fix).
Alertmanager pages on ``kind="system", severity="critical"`` only; market alerts (the alerts
service's, labelled ``source="klinebus"``) never page (monitoring/alertmanager/alertmanager.yml).
"""

from __future__ import annotations

from dataclasses import dataclass, field

SERVICES = ("ingest", "archive", "features", "charts", "inference", "vlm", "trainer", "alerts")
# Scrape jobs the ServiceDown rule watches: the services and the Redis exporter.
JOBS = (*SERVICES, "redis-exporter")
# Where runbook_url points: docs/alerts.md's section for the alert (a GitHub heading anchor).
RUNBOOK_BASE = "https://github.com/klinebus/klinebus/blob/main/docs/alerts.md"
KIND = "system"


@dataclass(frozen=True)
class Case:
    """A promtool unit case: ``series`` (selector -> promtool expanding notation, one sample per
    minute), evaluated at ``at``; ``fires`` lists the label sets expected (empty: must not fire)."""

    series: dict[str, str]
    at: str
    fires: tuple[dict[str, str], ...] = ()


@dataclass(frozen=True)
class Rule:
    name: str
    group: str
    expr: str
    severity: str
    summary: str
    check: str  # the first thing for the on-call engineer to look at
    for_: str = "0m"
    cases: tuple[Case, ...] = field(default=())

    @property
    def anchor(self) -> str:
        """The GitHub anchor of its docs/alerts.md heading (``### KlinebusIngestSilent``)."""
        return self.name.lower()

    def labels(self) -> dict[str, str]:
        return {"severity": self.severity, "kind": KIND}

    def annotations(self) -> dict[str, str]:
        return {"summary": self.summary, "description": self.check, "runbook_url": f"{RUNBOOK_BASE}#{self.anchor}"}


def _rate_counter(total_per_min: int, minutes: int) -> str:
    return f"0+{total_per_min}x{minutes}"


RULES: tuple[Rule, ...] = (
    # --- ingest ---------------------------------------------------------------------------------
    Rule(
        "KlinebusIngestSilent", "klinebus-ingest",
        "(sum(rate(klinebus_ingest_candles_published_total[10m])) or vector(0)) == 0",
        "critical", "No closed candle published on klines.v1 for 10 minutes",
        "Is ingest up (up{job=\"ingest\"})? Then klinebus_ingest_ws_connections and the ingest logs: "
        "exchange down, network, IP ban (rest_throttled_total).",
        for_="10m",
        cases=(
            Case({'klinebus_ingest_candles_published_total{job="ingest",source="ws"}': "0+3x30"}, "25m"),
            Case({'klinebus_ingest_candles_published_total{job="ingest",source="ws"}': "0+3x5 15x30"}, "30m", ({},)),
        ),
    ),
    Rule(
        "KlinebusNoWebsocket", "klinebus-ingest", "sum(klinebus_ingest_ws_connections) == 0",
        "critical", "Ingest holds no websocket connection to the exchange",
        "Ingest logs (ws_disconnects_total by cause); can the pod reach the exchange's stream host?",
        for_="5m",
        cases=(
            Case({'klinebus_ingest_ws_connections{job="ingest"}': "1x20"}, "15m"),
            Case({'klinebus_ingest_ws_connections{job="ingest"}': "1x5 0x20"}, "15m", ({},)),
        ),
    ),
    Rule(
        "KlinebusCandlesLate", "klinebus-ingest",
        'histogram_quantile(0.9, sum by (le) (rate(klinebus_alerts_close_to_publish_seconds_bucket{topic="klines.v1"}[10m]))) > 30',
        "warning", "Closed candles reach klines.v1 more than 30 s after they close (p90)",
        "Backfills instead of live candles? (klinebus_ingest_candles_published_total by source); exchange "
        "latency; Redis latency.",
        for_="10m",
        cases=(
            Case({
                'klinebus_alerts_close_to_publish_seconds_bucket{job="alerts",topic="klines.v1",interval="1m",le="5"}': "0+3x30",
                'klinebus_alerts_close_to_publish_seconds_bucket{job="alerts",topic="klines.v1",interval="1m",le="60"}': "0+3x30",
                'klinebus_alerts_close_to_publish_seconds_bucket{job="alerts",topic="klines.v1",interval="1m",le="+Inf"}': "0+3x30",
            }, "25m"),
            Case({
                'klinebus_alerts_close_to_publish_seconds_bucket{job="alerts",topic="klines.v1",interval="1m",le="5"}': "0x30",
                'klinebus_alerts_close_to_publish_seconds_bucket{job="alerts",topic="klines.v1",interval="1m",le="60"}': "0+3x30",
                'klinebus_alerts_close_to_publish_seconds_bucket{job="alerts",topic="klines.v1",interval="1m",le="+Inf"}': "0+3x30",
            }, "25m", ({},)),
        ),
    ),
    Rule(
        "KlinebusSymbolStale", "klinebus-ingest",
        'max by (symbol, interval) (klinebus_alerts_stream_candles_behind{topic="klines.v1"}) >= 2',
        "warning", "{{ $labels.symbol }} {{ $labels.interval }}: no new candle on klines.v1 for 2+ intervals",
        "Other symbols fresh too? One symbol: delisted or renamed on the exchange, or its backfill failing "
        "(ingest logs with that symbol). All of them: see KlinebusIngestSilent.",
        for_="5m",
        cases=(
            Case({'klinebus_alerts_stream_candles_behind{job="alerts",topic="klines.v1",symbol="BTCUSDT",interval="1m"}': "0x20"}, "15m"),
            Case({
                'klinebus_alerts_stream_candles_behind{job="alerts",topic="klines.v1",symbol="BTCUSDT",interval="1m"}': "0x5 1 2 3 4 5 6 7 8 9 10",
                'klinebus_alerts_stream_candles_behind{job="alerts",topic="klines.v1",symbol="ETHUSDT",interval="1m"}': "0x15",
            }, "15m", ({"symbol": "BTCUSDT", "interval": "1m"},)),
        ),
    ),
    Rule(
        "KlinebusGapsNotHealing", "klinebus-ingest",
        "sum(increase(klinebus_ingest_backfill_failures_total[15m])) > 0 "
        "and on() (sum(increase(klinebus_ingest_backfilled_candles_total[15m])) or vector(0)) == 0",
        "critical", "Backfills keep failing and none succeeded for 15 minutes: gaps stay open",
        "klinebus_ingest_rest_requests_total by status and rest_throttled_total; the exchange's REST host "
        "reachable from the pod? Features and inference wait at the gap until it heals.",
        for_="15m",
        cases=(
            Case({
                'klinebus_ingest_backfill_failures_total{job="ingest",interval="1m"}': "0+1x40",
                'klinebus_ingest_backfilled_candles_total{job="ingest",interval="1m"}': "0+2x40",
            }, "35m"),
            Case({
                'klinebus_ingest_backfill_failures_total{job="ingest",interval="1m"}': "0+1x40",
                'klinebus_ingest_backfilled_candles_total{job="ingest",interval="1m"}': "5x40",
            }, "35m", ({},)),
        ),
    ),
    Rule(
        "KlinebusHolePublished", "klinebus-ingest",
        "sum by (topic, interval) (increase(klinebus_alerts_stream_holes_total[15m])) > 0",
        "critical", "{{ $labels.topic }}: a candle was published after a missing one ({{ $labels.interval }})",
        "The watcher's log line names the symbol and the open_time range; backfill it with "
        "`klinebus history import` and check ingest's gap logs around that time.",
        cases=(
            Case({'klinebus_alerts_stream_holes_total{job="alerts",topic="klines.v1",interval="1m"}': "0x20"}, "15m"),
            Case({'klinebus_alerts_stream_holes_total{job="alerts",topic="klines.v1",interval="1m"}': "0x10 1x10"}, "15m",
                 ({"topic": "klines.v1", "interval": "1m"},)),
        ),
    ),
    Rule(
        "KlinebusBackfillFailing", "klinebus-ingest",
        "sum(increase(klinebus_ingest_backfill_failures_total[15m])) > 3",
        "warning", "REST backfills keep failing: gaps stay open until they succeed",
        "klinebus_ingest_rest_requests_total by status; ingest logs.",
        cases=(
            Case({'klinebus_ingest_backfill_failures_total{job="ingest",interval="1m"}': "0x20"}, "15m"),
            Case({'klinebus_ingest_backfill_failures_total{job="ingest",interval="1m"}': "0+1x20"}, "15m", ({},)),
        ),
    ),
    Rule(
        "KlinebusExchangeThrottling", "klinebus-ingest",
        "sum(increase(klinebus_ingest_rest_throttled_total[10m])) > 0",
        "warning", "The exchange answered 429/418: REST paused for Retry-After",
        "klinebus_ingest_rest_used_weight (of 6000/min); more replicas or symbols than the IP's weight allows?",
        cases=(
            Case({'klinebus_ingest_rest_throttled_total{job="ingest"}': "0x20"}, "15m"),
            Case({'klinebus_ingest_rest_throttled_total{job="ingest"}': "0x10 1x10"}, "15m", ({},)),
        ),
    ),
    # --- the bus --------------------------------------------------------------------------------
    Rule(
        "KlinebusConsumerLagGrowing", "klinebus-bus",
        "max by (topic, group) (klinebus_bus_group_lag_entries) > 1000 "
        "and max by (topic, group) (deriv(klinebus_bus_group_lag_entries[10m])) > 0",
        "warning", "{{ $labels.group }} falls behind on {{ $labels.topic }}: lag above 1000 and growing",
        "klinebus_bus_consumer_stalled and the group's handle_seconds: stalled on Redis, or too slow for the "
        "rate? Entries past the stream cap are lost (KlinebusEntriesTrimmedUnconsumed).",
        for_="10m",
        cases=(
            Case({'klinebus_bus_group_lag_entries{job="features",topic="klines.v1",group="features"}': "1500x30"}, "25m"),
            Case({'klinebus_bus_group_lag_entries{job="features",topic="klines.v1",group="features"}': "1000+100x30"}, "25m",
                 ({"topic": "klines.v1", "group": "features"},)),
        ),
    ),
    Rule(
        "KlinebusEntriesTrimmedUnconsumed", "klinebus-bus",
        "sum by (topic, group) (increase(klinebus_bus_trimmed_unconsumed_total[10m])) > 0",
        "critical", "{{ $labels.topic }}: entries trimmed before {{ $labels.group }} consumed them (lost to it)",
        "The group's lag before the trim; raise KLINEBUS_STREAM_MAXLEN (and Redis maxmemory) or fix the slow "
        "consumer. Refill from the archive if the consumer needs them.",
        cases=(
            Case({'klinebus_bus_trimmed_unconsumed_total{job="charts",topic="klines.v1",group="charts"}': "0x20"}, "15m"),
            Case({'klinebus_bus_trimmed_unconsumed_total{job="charts",topic="klines.v1",group="charts"}': "0x10 40x10"}, "15m",
                 ({"topic": "klines.v1", "group": "charts"},)),
        ),
    ),
    Rule(
        "KlinebusConsumerStalled", "klinebus-bus",
        "max by (service, topic, reason) (klinebus_bus_consumer_stalled) == 1",
        "critical", "{{ $labels.service }} stalled on {{ $labels.topic }}: {{ $labels.reason }}",
        "The reason names it: oom/readonly (Redis maxmemory, a replica promoted), loading (Redis restarting), "
        "connection/timeout (network). Redis INFO and its logs first.",
        for_="5m",
        cases=(
            Case({'klinebus_bus_consumer_stalled{job="features",service="features",topic="klines.v1",reason="oom"}': "0x20"}, "15m"),
            Case({'klinebus_bus_consumer_stalled{job="features",service="features",topic="klines.v1",reason="oom"}': "0x5 1x15"}, "15m",
                 ({"service": "features", "topic": "klines.v1", "reason": "oom"},)),
        ),
    ),
    Rule(
        "KlinebusConsumerDown", "klinebus-bus",
        "max by (service, topic) (klinebus_bus_consumer_up) == 0",
        "critical", "{{ $labels.service }}: its consumer of {{ $labels.topic }} is not running",
        "The service's /healthz and logs (a consumer task died); the pod restarts when /healthz fails.",
        for_="5m",
        cases=(
            Case({'klinebus_bus_consumer_up{job="vlm",service="vlm",topic="charts.v1"}': "1x20"}, "15m"),
            Case({'klinebus_bus_consumer_up{job="vlm",service="vlm",topic="charts.v1"}': "1x5 0x15"}, "15m",
                 ({"service": "vlm", "topic": "charts.v1"},)),
        ),
    ),
    Rule(
        "KlinebusPendingStuck", "klinebus-bus",
        "max by (topic, group) (klinebus_bus_group_oldest_pending_seconds) > 600",
        "warning", "{{ $labels.group }} on {{ $labels.topic }}: an entry delivered 10+ minutes ago is still not acknowledged",
        "A handler stuck on one entry (retries_total rising?) or a dead replica whose entries were not "
        "reclaimed: klinebus_bus_consumer_up and the group's consumers (XINFO CONSUMERS).",
        for_="5m",
        cases=(
            Case({'klinebus_bus_group_oldest_pending_seconds{job="archive",topic="klines.v1",group="archive"}': "0+1x20"}, "15m"),
            Case({'klinebus_bus_group_oldest_pending_seconds{job="archive",topic="klines.v1",group="archive"}': "0+60x20"}, "19m",
                 ({"topic": "klines.v1", "group": "archive"},)),
        ),
    ),
    Rule(
        "KlinebusDeadLetters", "klinebus-bus",
        'sum by (job) (rate({__name__=~"klinebus_.*_dead_letters_total"}[10m])) > 0',
        "warning", "{{ $labels.job }} keeps dead-lettering messages",
        "klinebus tail dead-letters.v1 -n 20: the reason says which input and why.",
        for_="10m",
        cases=(
            Case({'klinebus_features_dead_letters_total{job="features",source="klines.v1",reason="high"}': "3x30"}, "25m"),
            Case({'klinebus_features_dead_letters_total{job="features",source="klines.v1",reason="high"}': "0+1x30"}, "25m",
                 ({"job": "features"},)),
        ),
    ),
    # --- models ---------------------------------------------------------------------------------
    Rule(
        "KlinebusNoPredictions", "klinebus-models",
        '(sum(rate(klinebus_inference_events_out_total{topic="predictions.v1"}[15m])) or vector(0)) == 0',
        "critical", "No predictions published for 15 minutes",
        "Is features publishing (klinebus_features_events_out_total)? Then inference's /readyz (model) and logs.",
        for_="15m",
        cases=(
            Case({'klinebus_inference_events_out_total{job="inference",topic="predictions.v1"}': "0+5x40"}, "35m"),
            Case({'klinebus_inference_events_out_total{job="inference",topic="predictions.v1"}': "0+5x5 25x40"}, "40m", ({},)),
        ),
    ),
    Rule(
        "KlinebusPredictionsStale", "klinebus-models",
        'max by (symbol, interval) (klinebus_alerts_stream_candles_behind{topic="predictions.v1"}) >= 3',
        "warning", "{{ $labels.symbol }} {{ $labels.interval }}: the newest prediction is 3+ intervals old",
        "Fresh on klines.v1 and features.v1 for that symbol (the freshness dashboard)? Then inference's routing: "
        "does a served model cover the pair?",
        for_="5m",
        cases=(
            Case({'klinebus_alerts_stream_candles_behind{job="alerts",topic="predictions.v1",symbol="BTCUSDT",interval="1m"}': "0x20"}, "15m"),
            Case({'klinebus_alerts_stream_candles_behind{job="alerts",topic="predictions.v1",symbol="BTCUSDT",interval="1m"}': "0x5 3x15"}, "15m",
                 ({"symbol": "BTCUSDT", "interval": "1m"},)),
        ),
    ),
    Rule(
        "KlinebusModelBehindPersistence", "klinebus-models",
        "max by (model, symbol, interval) (klinebus_inference_model_behind_persistence) == 1",
        "warning", "{{ $labels.model }} on {{ $labels.symbol }} {{ $labels.interval }} forecasts worse than persistence",
        "The model-scores dashboard: since when, and on which pairs? A regime change the model never saw; "
        "retrain on recent data, or demote it (publish the previous version on models.v1).",
        for_="30m",
        cases=(
            Case({'klinebus_inference_model_behind_persistence{job="inference",model="lstm",symbol="BTCUSDT",interval="1m"}': "0x60"}, "50m"),
            Case({'klinebus_inference_model_behind_persistence{job="inference",model="lstm",symbol="BTCUSDT",interval="1m"}': "0x10 1x50"}, "50m",
                 ({"model": "lstm", "symbol": "BTCUSDT", "interval": "1m"},)),
        ),
    ),
    Rule(
        "KlinebusModelStale", "klinebus-models",
        "time() - max by (model) (klinebus_inference_last_prediction_timestamp_seconds) > 7200",
        "warning", "{{ $labels.model }} has published no forecast for 2 hours",
        "klinebus_inference_skipped_total by reason for the model (not_warm, feature_set_mismatch) and its "
        "routing: which (symbol, interval) pairs does its package declare?",
        for_="5m",
        cases=(
            Case({'klinebus_inference_last_prediction_timestamp_seconds{job="inference",model="lstm"}': "0+60x200"}, "190m"),
            Case({'klinebus_inference_last_prediction_timestamp_seconds{job="inference",model="lstm"}': "0+60x60 3600x140"}, "190m",
                 ({"model": "lstm"},)),
        ),
    ),
    Rule(
        "KlinebusVlmBackedUp", "klinebus-models",
        "max(klinebus_vlm_pending_charts) > 20 "
        'or max by (topic, group) (klinebus_bus_group_lag_entries{topic="charts.v1", group="vlm"}) > 100',
        "warning", "The VLM cannot keep up with the charts (20+ waiting, or charts.v1 lag above 100)",
        "Seconds per chart (klinebus_vlm_phase_seconds) against the chart cadence x pairs: a GPU lost "
        "(klinebus_vlm_gpu_layers 0), a slow remote backend; raise KLINEBUS_CADENCE_S of charts or add a backend.",
        for_="15m",
        cases=(
            Case({'klinebus_vlm_pending_charts{job="vlm"}': "5x40"}, "30m"),
            Case({'klinebus_vlm_pending_charts{job="vlm"}': "5x5 30x40"}, "30m", ({},)),
        ),
    ),
    # --- services -------------------------------------------------------------------------------
    Rule(
        "KlinebusServiceDown", "klinebus-services",
        f'up{{job=~"{"|".join(JOBS)}"}} == 0',
        "critical", "{{ $labels.job }} ({{ $labels.instance }}) cannot be scraped",
        "kubectl -n klinebus get pods / docker compose ps: crash loop (logs of the previous container), "
        "OOM kill, or /metrics port not reachable.",
        for_="5m",
        cases=(
            Case({'up{job="features",instance="features:9000"}': "1x20"}, "15m"),
            Case({'up{job="features",instance="features:9000"}': "1x5 0x15"}, "15m",
                 ({"job": "features", "instance": "features:9000"},)),
        ),
    ),
    Rule(
        "KlinebusAlertDeliveryFailing", "klinebus-services",
        'sum by (sink, outcome) (increase(klinebus_alerts_notifications_total{outcome!="delivered"}[15m])) > 0',
        "warning", "Alerts to {{ $labels.sink }} were not delivered ({{ $labels.outcome }})",
        "The alerts service's log lines name the destination and its answer; dead_lettered: the webhook URL "
        "is wrong or revoked (HTTP 4xx), fix the secret; pending: the destination is down (klinebus_alerts_owed "
        "counts what it owes; paid when it is back).",
        cases=(
            Case({'klinebus_alerts_notifications_total{job="alerts",sink="discord",outcome="dead_lettered"}': "0x20"}, "15m"),
            Case({'klinebus_alerts_notifications_total{job="alerts",sink="discord",outcome="dead_lettered"}': "0x10 1x10"}, "15m",
                 ({"sink": "discord", "outcome": "dead_lettered"},)),
        ),
    ),
    # --- redis (redis_exporter, k8s/components/monitoring) -----------------------------------------
    Rule(
        "KlinebusRedisDown", "klinebus-redis", "max by (instance) (redis_up) == 0",
        "critical", "The Redis exporter cannot reach Redis: every service's bus is down",
        "The exporter's log (auth? DNS?), then Redis itself: kubectl -n klinebus get pods -l app.kubernetes.io/name=redis "
        "or the managed Redis' console. The services stall and retry (KlinebusConsumerStalled).",
        for_="2m",
        cases=(
            Case({'redis_up{job="redis-exporter",instance="redis-exporter:9121"}': "1x20"}, "15m"),
            Case({'redis_up{job="redis-exporter",instance="redis-exporter:9121"}': "1x5 0x15"}, "15m",
                 ({"instance": "redis-exporter:9121"},)),
        ),
    ),
    Rule(
        "KlinebusRedisMemoryHigh", "klinebus-redis",
        "max by (instance) (redis_memory_used_bytes / (redis_memory_max_bytes > 0)) > 0.85",
        "warning", "Redis uses more than 85% of its maxmemory",
        "Which streams hold it (klinebus redis: MEMORY USAGE klinebus:{<topic>}) and each group's lag: a slow "
        "consumer keeps entries, a cap (KLINEBUS_STREAM_MAXLEN) larger than memory allows.",
        for_="10m",
        cases=(
            Case({'redis_memory_used_bytes{job="redis-exporter",instance="r:9121"}': "500x30",
                  'redis_memory_max_bytes{job="redis-exporter",instance="r:9121"}': "1000x30"}, "25m"),
            Case({'redis_memory_used_bytes{job="redis-exporter",instance="r:9121"}': "900x30",
                  'redis_memory_max_bytes{job="redis-exporter",instance="r:9121"}': "1000x30"}, "25m",
                 ({"instance": "r:9121"},)),
        ),
    ),
    Rule(
        "KlinebusRedisMemoryFull", "klinebus-redis",
        "max by (instance) (redis_memory_used_bytes / (redis_memory_max_bytes > 0)) > 0.95",
        "critical", "Redis is at maxmemory: writes are refused (noeviction), producers stall",
        "The same as KlinebusRedisMemoryHigh, now: the services report reason=oom in klinebus_bus_consumer_stalled.",
        for_="5m",
        cases=(
            Case({'redis_memory_used_bytes{job="redis-exporter",instance="r:9121"}': "900x30",
                  'redis_memory_max_bytes{job="redis-exporter",instance="r:9121"}': "1000x30"}, "25m"),
            Case({'redis_memory_used_bytes{job="redis-exporter",instance="r:9121"}': "990x30",
                  'redis_memory_max_bytes{job="redis-exporter",instance="r:9121"}': "1000x30"}, "25m",
                 ({"instance": "r:9121"},)),
        ),
    ),
    Rule(
        "KlinebusRedisNoMaxmemory", "klinebus-redis", "max by (instance) (redis_memory_max_bytes) == 0",
        "warning", "Redis has no maxmemory: it grows until the kernel kills it",
        "CONFIG GET maxmemory; set it below the container or instance memory (the dev Redis: --maxmemory).",
        for_="15m",
        cases=(
            Case({'redis_memory_max_bytes{job="redis-exporter",instance="r:9121"}': "1000x30"}, "25m"),
            Case({'redis_memory_max_bytes{job="redis-exporter",instance="r:9121"}': "0x30"}, "25m", ({"instance": "r:9121"},)),
        ),
    ),
    Rule(
        "KlinebusRedisEvicting", "klinebus-redis", "sum by (instance) (increase(redis_evicted_keys_total[10m])) > 0",
        "critical", "Redis evicted keys: stream entries, groups or checkpoints may be gone",
        "CONFIG GET maxmemory-policy: it must be noeviction (docs/bus.md, managed Redis requirements).",
        cases=(
            Case({'redis_evicted_keys_total{job="redis-exporter",instance="r:9121"}': "0x20"}, "15m"),
            Case({'redis_evicted_keys_total{job="redis-exporter",instance="r:9121"}': "0x10 5x10"}, "15m",
                 ({"instance": "r:9121"},)),
        ),
    ),
    Rule(
        "KlinebusRedisAofFailing", "klinebus-redis",
        "min by (instance) (redis_aof_last_write_status) == 0 or min by (instance) (redis_aof_last_bgrewrite_status) == 0",
        "critical", "Redis cannot write its append-only file: acknowledged events are not durable",
        "Redis' log and its volume: disk full, volume read-only, permissions. INFO persistence names the failing step.",
        for_="2m",
        cases=(
            Case({'redis_aof_last_write_status{job="redis-exporter",instance="r:9121"}': "1x20",
                  'redis_aof_last_bgrewrite_status{job="redis-exporter",instance="r:9121"}': "1x20"}, "15m"),
            Case({'redis_aof_last_write_status{job="redis-exporter",instance="r:9121"}': "1x5 0x15",
                  'redis_aof_last_bgrewrite_status{job="redis-exporter",instance="r:9121"}': "1x20"}, "15m",
                 ({"instance": "r:9121"},)),
        ),
    ),
    Rule(
        "KlinebusRedisAofDisabled", "klinebus-redis", "max by (instance) (redis_aof_enabled) == 0",
        "warning", "Redis runs without AOF: a restart loses what was acknowledged since the last snapshot",
        "CONFIG GET appendonly; klinebus' nothing-lost guarantee needs appendonly yes (appendfsync always in dev).",
        for_="15m",
        cases=(
            Case({'redis_aof_enabled{job="redis-exporter",instance="r:9121"}': "1x30"}, "25m"),
            Case({'redis_aof_enabled{job="redis-exporter",instance="r:9121"}': "0x30"}, "25m", ({"instance": "r:9121"},)),
        ),
    ),
    Rule(
        "KlinebusRedisReplicaLinkDown", "klinebus-redis", "max by (instance) (redis_master_link_up) == 0",
        "critical", "A Redis replica lost its link to the primary: a failover now loses writes",
        "INFO replication on the replica (master_link_down_since_seconds) and the network between them.",
        for_="5m",
        cases=(
            Case({'redis_master_link_up{job="redis-exporter",instance="r:9121"}': "1x20"}, "15m"),
            Case({'redis_master_link_up{job="redis-exporter",instance="r:9121"}': "1x5 0x15"}, "15m", ({"instance": "r:9121"},)),
        ),
    ),
    Rule(
        "KlinebusRedisReplicaLost", "klinebus-redis",
        "max by (instance) (redis_connected_slaves) < max by (instance) (max_over_time(redis_connected_slaves[1h]))",
        "warning", "The Redis primary has fewer replicas than in the last hour",
        "INFO replication on the primary; is the replica pod/node up? A replica resyncing shows here for a while.",
        for_="10m",
        cases=(
            Case({'redis_connected_slaves{job="redis-exporter",instance="r:9121"}': "1x40"}, "35m"),
            Case({'redis_connected_slaves{job="redis-exporter",instance="r:9121"}': "1x10 0x30"}, "35m", ({"instance": "r:9121"},)),
        ),
    ),
)

# Rules whose metrics other services are still adding; generated only when their source exports
# them (see metrics_missing in tests/monitoring), listed here so docs/alerts.md says so.
PLANNED: tuple[str, ...] = ()


def groups() -> list[dict]:
    out: dict[str, list[dict]] = {}
    for r in RULES:
        rule = {"alert": r.name, "expr": r.expr}
        if r.for_ != "0m":
            rule["for"] = r.for_
        rule["labels"] = r.labels()
        rule["annotations"] = r.annotations()
        out.setdefault(r.group, []).append(rule)
    return [{"name": name, "rules": rules} for name, rules in out.items()]


def prometheus_rules(for_override: str | None = None) -> dict:
    """The Prometheus rules file; ``for_override`` replaces every ``for`` (the live test evaluates
    the same expressions without waiting minutes)."""
    gs = groups()
    if for_override is not None:
        for g in gs:
            for r in g["rules"]:
                r["for"] = for_override
    return {"groups": gs}


def prometheus_rule_resource() -> dict:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "klinebus", "namespace": "klinebus", "labels": {
            # the label your Prometheus' ruleSelector matches (k8s/components/monitoring says how to set it)
            "release": "kube-prometheus-stack",
            "app.kubernetes.io/part-of": "klinebus", "app.kubernetes.io/component": "monitoring"}},
        "spec": {"groups": groups()},
    }


def _render(template: str, labels: dict[str, str]) -> str:
    import re

    return re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m.group(1), ""), template)


def promtool_tests(rules_file: str) -> dict:
    """promtool's unit tests: every case of every rule."""
    tests = []
    for r in RULES:
        for case in r.cases:
            exp = []
            for labels in case.fires:
                full = {**labels, **r.labels()}
                exp.append({
                    "exp_labels": full,
                    "exp_annotations": {k: _render(v, full) for k, v in r.annotations().items()},
                })
            tests.append({
                "name": f"{r.name} {'fires' if case.fires else 'stays quiet'} at {case.at}",
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in case.series.items()],
                "alert_rule_test": [{"eval_time": case.at, "alertname": r.name, "exp_alerts": exp}],
            })
    return {"rule_files": [rules_file], "evaluation_interval": "1m", "tests": tests}


# The fix, once the first checks found the cause: docs/alerts.md's runbook section for each rule.
FIXES: dict[str, str] = {
    "KlinebusIngestSilent": "Restart ingest if it is wedged (kubectl -n klinebus rollout restart deploy/ingest); if the "
    "exchange is down or the IP banned, wait for it (ingest backfills the gap when it is back) and tell the users "
    "downstream; a NetworkPolicy or egress change: allow ingest to reach the exchange on 443.",
    "KlinebusNoWebsocket": "Fix the path to the exchange's stream host (DNS, egress 443, proxy); ingest reconnects by "
    "itself with backoff and backfills what it missed over REST.",
    "KlinebusCandlesLate": "Mostly backfills: let them finish. Otherwise move ingest closer to the exchange or fix "
    "Redis latency (KlinebusRedisMemoryHigh, slow disk with appendfsync always).",
    "KlinebusSymbolStale": "A delisted or renamed symbol: remove it from KLINEBUS_SYMBOLS (the config map) and roll "
    "ingest. A failing backfill: see KlinebusBackfillFailing.",
    "KlinebusGapsNotHealing": "Restore REST access (egress, rate limit: fewer symbols or replicas per IP); once a "
    "backfill succeeds the gap closes and features/inference move on. Long outages: `klinebus history import` the range.",
    "KlinebusHolePublished": "Backfill the named range with `klinebus history import`; the consumers are idempotent on "
    "(symbol, interval, open_time), so the late candles are processed once. Then find why ingest skipped it (its gap logs).",
    "KlinebusBackfillFailing": "As KlinebusGapsNotHealing: restore REST access or lower the request weight.",
    "KlinebusExchangeThrottling": "Lower the weight: fewer symbols/intervals per IP, one ingest replica, larger "
    "backfill pages less often; ingest already honours Retry-After.",
    "KlinebusConsumerLagGrowing": "A stalled group: fix what it stalls on (the reason label of KlinebusConsumerStalled). "
    "Too slow: add replicas of a competing consumer (the keda component does it on lag) or resources for an ordered one.",
    "KlinebusEntriesTrimmedUnconsumed": "Raise KLINEBUS_STREAM_MAXLEN (and Redis maxmemory to hold it) or speed the "
    "consumer up; what was trimmed is gone from the stream: replay it from the Parquet archive if the consumer needs it.",
    "KlinebusConsumerStalled": "oom: free or add Redis memory (KlinebusRedisMemoryFull); readonly: point the URL at the "
    "new primary; loading: wait; connection/timeout: the network or Redis itself. The consumer resumes by itself.",
    "KlinebusConsumerDown": "Restart the pod (liveness does when /healthz fails); the log line before the task died "
    "names the bug: file it with that line.",
    "KlinebusPendingStuck": "A dead replica's entries are reclaimed after KLINEBUS_RECLAIM_IDLE_MS: check the "
    "reclaimer runs; a handler stuck on one entry: restart that pod, the entry is retried or dead-lettered.",
    "KlinebusDeadLetters": "Fix the producer of the bad input the reason names (or the rule/config it breaks); dead "
    "letters are kept on dead-letters.v1 for replay once fixed.",
    "KlinebusNoPredictions": "Features silent: see its alerts. Inference not ready: publish or fix the model package "
    "(models.v1) it waits for; a crash loop: its previous container's log.",
    "KlinebusPredictionsStale": "Publish a model that serves the pair (its package's serves list) or route the pair to "
    "persistence; upstream staleness: fix that first.",
    "KlinebusModelBehindPersistence": "Retrain on recent data (a datasets.v1 request) or demote: publish the previous "
    "version on models.v1. A market regime change is not a system fault; this alert never pages.",
    "KlinebusModelStale": "Re-publish the model with the right feature set and pairs, or retire it.",
    "KlinebusVlmBackedUp": "Add VLM replicas or a GPU (components/gpu, keda scales on charts.v1 lag), a faster remote "
    "backend, or a longer charts cadence; the VLM keeps the latest chart per pair when behind.",
    "KlinebusServiceDown": "Crash loop: the previous container's log (kubectl logs -p); OOM: raise the memory limit; "
    "not reachable: the Service/port or a NetworkPolicy (allow-scrapes).",
    "KlinebusAlertDeliveryFailing": "Fix or rotate the webhook URL in the klinebus-alerts Secret and roll alerts; a "
    "destination outage needs nothing: owed notifications are paid when it is back.",
    "KlinebusRedisDown": "Bring Redis back (its pod, node, volume; the managed service's status); the services "
    "reconnect and resume from their groups' positions, nothing acknowledged is lost with AOF on.",
    "KlinebusRedisMemoryHigh": "Raise maxmemory (and the pod's limit) or lower KLINEBUS_STREAM_MAXLEN / set "
    "KLINEBUS_STREAM_RETENTION_MS; fix the slow consumer holding entries.",
    "KlinebusRedisMemoryFull": "Now: raise maxmemory (CONFIG SET maxmemory, then the manifest) so writes resume; then "
    "as KlinebusRedisMemoryHigh. Never switch to an evicting policy: it deletes stream data.",
    "KlinebusRedisNoMaxmemory": "Set maxmemory below the memory Redis may use, with maxmemory-policy noeviction.",
    "KlinebusRedisEvicting": "CONFIG SET maxmemory-policy noeviction (and in its config); check what was evicted "
    "against the archive and replay if needed (klinebus history import).",
    "KlinebusRedisAofFailing": "Free or grow the volume, fix its permissions; Redis retries the write by itself. Until "
    "then it refuses writes (the services stall, nothing acknowledged is lost).",
    "KlinebusRedisAofDisabled": "CONFIG SET appendonly yes and persist it in the config (the dev Redis starts with "
    "--appendonly yes); managed Redis: enable AOF persistence in its settings.",
    "KlinebusRedisReplicaLinkDown": "Restore the network between replica and primary; a replica that cannot resync: "
    "recreate it. Do not fail over to it while its link is down.",
    "KlinebusRedisReplicaLost": "Bring the replica back (pod, node, managed Redis' console); until then a primary "
    "failure has no warm standby.",
}


def runbook_markdown() -> str:
    """docs/alerts.md's runbook: one section per rule, the anchor its runbook_url points to."""
    out = []
    for r in RULES:
        summary = r.summary.replace("{{ $labels.", "<").replace(" }}", ">")
        out += [f"### {r.name}", "",
                f"*{r.severity}*, after {r.for_}; group `{r.group}`; pages: "
                f"{'yes' if r.severity == 'critical' else 'no'}.", "",
                f"**Meaning.** {summary}.", "",
                f"**First checks.** {r.check}", "",
                f"**Fix.** {FIXES[r.name]}", "",
                f"Expression: `{r.expr}`", ""]
    return "\n".join(out).rstrip("\n")
