"""The system alert rules: one list, each rule with what it means, the first thing to check, and
unit cases (input series that must and must not make it fire) that promtool runs.

Metric sources: ingest (candles, websocket, REST), the bus edge (``klinebus_bus_*``: group lag,
trims, stalls), inference (predictions, live scores), the alerts service's stream watcher
(``klinebus_alerts_stream_*``, ``close_to_publish_seconds``: freshness measured from outside the
producers) and every service's ``dead_letters_total``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SERVICES = ("ingest", "archive", "features", "charts", "inference", "vlm", "trainer", "alerts")


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

    def annotations(self) -> dict[str, str]:
        return {"summary": self.summary, "description": self.check}


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
        f'up{{job=~"{"|".join(SERVICES)}"}} == 0',
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
        rule["labels"] = {"severity": r.severity}
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
        "metadata": {"name": "klinebus", "namespace": "klinebus", "labels": {"app.kubernetes.io/part-of": "klinebus"}},
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
                full = {**labels, "severity": r.severity}
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
