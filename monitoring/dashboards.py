"""The Grafana dashboards, as code: every panel follows the same conventions, and tests check that
each query names a metric a service exports and returns data from a real Prometheus scraping the
running services (a panel that would show "No data" on a healthy pipeline fails the test).

Counters with labels have no series until their first increment, so sums over them end in
``or vector(0)``: a quiet pipeline shows 0, not "No data"."""

from __future__ import annotations

from dataclasses import dataclass

DS = {"type": "prometheus", "uid": "${datasource}"}


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    targets: tuple[tuple[str, str], ...]  # (expr, legend)
    kind: str = "timeseries"
    width: int = 12
    description: str = ""




PIPELINE = (
    Panel("Events per stage (published)", "ops", (
        ("sum(rate(klinebus_ingest_candles_published_total[5m])) or vector(0)", "klines.v1"),
        ('sum(rate(klinebus_features_events_out_total{topic="features.v1"}[5m])) or vector(0)', "features.v1"),
        ('sum(rate(klinebus_inference_events_out_total{topic="predictions.v1"}[5m])) or vector(0)', "predictions.v1"),
        ("sum(rate(klinebus_charts_rendered_total[5m])) or vector(0)", "charts.v1"),
        ("sum(rate(klinebus_archive_rows_written_total[5m])) or vector(0)", "archived rows"),
    ), description="Closed candles in, and what each stage made of them."),
    Panel("Entries seen on each topic (stream watcher)", "ops", (
        ("sum by (topic) (rate(klinebus_alerts_stream_entries_total[5m]))", "{{topic}}"),
    ), description="Counted by the alerts service reading the streams like any subscriber."),
    Panel("Latency from candle close to publish, p50 / p99, by topic", "s", (
        ("histogram_quantile(0.5, sum by (topic, le) (rate(klinebus_alerts_close_to_publish_seconds_bucket[5m])))", "p50 {{topic}}"),
        ("histogram_quantile(0.99, sum by (topic, le) (rate(klinebus_alerts_close_to_publish_seconds_bucket[5m])))", "p99 {{topic}}"),
    ), description="Entry id time minus the candle's close: what a subscriber of each topic waits."),
    Panel("Consumer group lag (entries not yet delivered)", "short", (
        ("max by (topic, group) (klinebus_bus_group_lag_entries)", "{{group}} on {{topic}}"),
    )),
    Panel("Oldest pending entry, by group", "s", (
        ("max by (topic, group) (klinebus_bus_group_oldest_pending_seconds)", "{{group}} on {{topic}}"),
    )),
    Panel("Entries trimmed before consumed; consumers stalled", "short", (
        ("sum by (topic, group) (increase(klinebus_bus_trimmed_unconsumed_total[1h])) or vector(0)", "trimmed {{group}} {{topic}}"),
        ("sum by (service, reason) (klinebus_bus_consumer_stalled) or vector(0)", "stalled {{service}} {{reason}}"),
    )),
    Panel("Dead letters by service and reason", "ops", (
        ('sum by (job, reason) (rate({__name__=~"klinebus_.*_dead_letters_total"}[5m])) or vector(0)', "{{job}} {{reason}}"),
    )),
    Panel("Duplicates skipped (re-deliveries, replays)", "ops", (
        ('sum by (job, topic) (rate({__name__=~"klinebus_.*_duplicates_total"}[5m])) or vector(0)', "{{job}} {{topic}}"),
    )),
    Panel("Handle time per event p95, by service", "s", (
        ('histogram_quantile(0.95, sum by (job, le) (rate({__name__=~"klinebus_.*_handle_seconds_bucket"}[5m])))', "{{job}}"),
    )),
    Panel("Websocket connections", "short", (
        ("sum(klinebus_ingest_ws_connections)", "open"),
        ("sum by (cause) (increase(klinebus_ingest_ws_disconnects_total[1h])) or vector(0)", "ended: {{cause}}"),
    )),
    Panel("Gaps found and backfilled; backfill failures", "short", (
        ("sum by (reason) (increase(klinebus_ingest_gaps_total[1h])) or vector(0)", "{{reason}}"),
        ("sum(increase(klinebus_ingest_backfill_failures_total[1h])) or vector(0)", "backfill failures"),
    )),
    Panel("Exchange REST weight and throttling", "short", (
        ("max(klinebus_ingest_rest_used_weight)", "used weight (of 6000/min)"),
        ("sum(increase(klinebus_ingest_rest_throttled_total[1h])) or vector(0)", "429/418 answers"),
    )),
    Panel("Services up", "short", (
        ('sum by (job) (up{job=~"ingest|archive|features|charts|inference|vlm|trainer|alerts"})', "{{job}}"),
    )),
    Panel("System alerts firing", "short", (
        ('count by (alertname) (ALERTS{alertstate="firing"}) or vector(0)', "{{alertname}}"),
    )),
)

FRESHNESS = (
    Panel("Candles behind, per symbol (klines.v1)", "short", (
        ('max by (symbol, interval) (klinebus_alerts_stream_candles_behind{topic="klines.v1"})', "{{symbol}} {{interval}}"),
    ), kind="bargauge", width=24, description="Whole intervals since the newest candle closed; 0 is fresh."),
    Panel("Age of the newest closed candle, per symbol", "s", (
        ('time() - max by (symbol, interval) (klinebus_alerts_stream_last_close_time_seconds{topic="klines.v1"})', "{{symbol}} {{interval}}"),
    )),
    Panel("Age of the newest prediction, per symbol", "s", (
        ('time() - max by (symbol, interval) (klinebus_alerts_stream_last_close_time_seconds{topic="predictions.v1"})', "{{symbol}} {{interval}}"),
    )),
    Panel("Candles behind per stage (worst symbol)", "short", (
        ("max by (topic) (klinebus_alerts_stream_candles_behind)", "{{topic}}"),
    )),
    Panel("Close-to-publish p90 by topic and interval", "s", (
        ("histogram_quantile(0.9, sum by (topic, interval, le) (rate(klinebus_alerts_close_to_publish_seconds_bucket[10m])))", "{{topic}} {{interval}}"),
    )),
    Panel("Holes published (candle after a missing one)", "short", (
        ("sum by (topic, interval) (increase(klinebus_alerts_stream_holes_total[1h])) or vector(0)", "{{topic}} {{interval}}"),
    )),
)

MODELS = (
    Panel("Rolling MAE / persistence MAE (above 1: behind persistence)", "short", (
        ("max by (model, symbol, interval) (klinebus_inference_score_mae_ratio)", "{{model}} {{symbol}} {{interval}}"),
    ), description="Live scores: each forecast judged when its target candle closes, beside persistence."),
    Panel("Rolling MAE beside persistence's", "short", (
        ("max by (model, symbol, interval) (klinebus_inference_score_mae)", "{{model}} {{symbol}} {{interval}}"),
        ("max by (symbol, interval) (klinebus_inference_score_baseline_mae)", "persistence {{symbol}} {{interval}}"),
    )),
    Panel("80 % interval coverage (target 0.8), beside persistence's empirical band", "percentunit", (
        ("max by (model, symbol, interval, horizon, target) (klinebus_inference_score_interval_coverage)",
         "{{model}} {{symbol}} {{interval}} {{target}}@{{horizon}}"),
        ("max by (model, symbol, interval, horizon, target) (klinebus_inference_score_baseline_interval_coverage)",
         "persistence band {{symbol}} {{interval}} {{target}}@{{horizon}} ({{model}})"),
    ), description="Share of the last scores whose actual fell inside the forecast's 80 % split-conformal interval "
                   "(predictions.v1 quantiles 0.1-0.9); well calibrated is 0.8. Persistence with the gate slice's "
                   "empirical quantiles is scored on the same candles."),
    Panel("80 % interval width / forecast (narrower at the same coverage is better)", "percentunit", (
        ("max by (model, symbol, interval, horizon, target) (klinebus_inference_score_interval_width_ratio)",
         "{{model}} {{symbol}} {{interval}} {{target}}@{{horizon}}"),
        ("max by (model, symbol, interval, horizon, target) (klinebus_inference_score_baseline_interval_width_ratio)",
         "persistence band {{symbol}} {{interval}} {{target}}@{{horizon}} ({{model}})"),
    )),
    Panel("Directional hit rate", "percentunit", (
        ("max by (model, symbol, interval) (klinebus_inference_score_direction_accuracy)", "{{model}} {{symbol}} {{interval}}"),
    )),
    Panel("Models behind persistence", "short", (
        ("sum by (model) (klinebus_inference_model_behind_persistence) or vector(0)", "{{model}}"),
    )),
    Panel("Forecasts per model", "ops", (
        ("sum by (model) (rate(klinebus_inference_predictions_total[5m]))", "{{model}}"),
    )),
    Panel("Seconds since each model's last forecast", "s", (
        ("time() - max by (model) (klinebus_inference_last_prediction_timestamp_seconds)", "{{model}}"),
    )),
    Panel("Close-to-forecast latency p95, by model", "s", (
        ("histogram_quantile(0.95, sum by (model, le) (rate(klinebus_inference_close_to_publish_seconds_bucket[5m])))", "{{model}}"),
    )),
    Panel("VLM: charts waiting, analyses by result", "short", (
        ("max(klinebus_vlm_pending_charts) or vector(0)", "waiting"),
        ("sum by (result) (increase(klinebus_vlm_analyses_total[1h])) or vector(0)", "{{result}}"),
    )),
)

MARKET_ALERTS = (
    Panel("Alert events by rule and status", "short", (
        ("sum by (rule, status) (increase(klinebus_alerts_received_total[1h])) or vector(0)", "{{rule}} {{status}}"),
    ), description="alerts.v1 as the alerts service consumed it."),
    Panel("Alerts firing now; notifications owed by a failing destination", "short", (
        ("max(klinebus_alerts_active)", "active"),
        ("max(klinebus_alerts_owed)", "owed"),
    ), kind="stat"),
    Panel("Notifications by destination and outcome", "short", (
        ("sum by (sink, outcome) (increase(klinebus_alerts_notifications_total[1h])) or vector(0)", "{{sink}} {{outcome}}"),
    )),
    Panel("Requests by destination and result (rate limited, errors)", "short", (
        ("sum by (sink, result) (increase(klinebus_alerts_attempts_total[1h])) or vector(0)", "{{sink}} {{result}}"),
    )),
    Panel("Fired to delivered, p95 by destination", "s", (
        ("histogram_quantile(0.95, sum by (sink, le) (rate(klinebus_alerts_fired_to_delivered_seconds_bucket[15m])))", "{{sink}}"),
    )),
    Panel("Market alert transitions published by inference", "short", (
        ("sum by (rule, status) (increase(klinebus_inference_alerts_total[1h])) or vector(0)", "{{rule}} {{status}}"),
    )),
)

BOARDS: dict[str, tuple[str, str, tuple[Panel, ...]]] = {
    "klinebus-pipeline": ("klinebus: pipeline overview", "Events per stage, lag, latency from candle close, health.", PIPELINE),
    "klinebus-freshness": ("klinebus: per-symbol freshness", "How far behind each symbol is on each topic.", FRESHNESS),
    "klinebus-models": ("klinebus: model scores against persistence", "Live scores of every served model and the VLM.", MODELS),
    "klinebus-market-alerts": ("klinebus: market alerts", "alerts.v1 and its delivery to Alertmanager and chat.", MARKET_ALERTS),
}


def build(uid: str) -> dict:
    title, description, panels = BOARDS[uid]
    out, x, y, row_h = [], 0, 0, 8
    for i, p in enumerate(panels):
        if x + p.width > 24:
            x, y = 0, y + row_h
        panel = {
            "id": i + 1,
            "type": p.kind,
            "title": p.title,
            "datasource": DS,
            "gridPos": {"h": row_h, "w": p.width, "x": x, "y": y},
            "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
            "targets": [
                {"refId": chr(65 + j), "datasource": DS, "expr": expr, "legendFormat": legend}
                for j, (expr, legend) in enumerate(p.targets)
            ],
        }
        if p.description:
            panel["description"] = p.description
        out.append(panel)
        x += p.width
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["klinebus"],
        "timezone": "utc",
        "schemaVersion": 39,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"}]},
        "links": [{"title": "klinebus", "type": "dashboards", "tags": ["klinebus"], "asDropdown": True}],
        "panels": out,
    }


def build_all() -> dict[str, dict]:
    return {uid: build(uid) for uid in BOARDS}


def queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, expr) for every target of every dashboard."""
    return [(uid, p.title, expr) for uid, (_, _, panels) in BOARDS.items() for p in panels for expr, _ in p.targets]
