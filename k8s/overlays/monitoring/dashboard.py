"""Writes grafana-dashboard.json (the committed file is this script's output):

    .venv/bin/python k8s/overlays/monitoring/dashboard.py

Kept as code so every panel uses the same conventions and a test can check that each
query names a metric the services really export.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).with_name("grafana-dashboard.json")

# (title, unit, [(expr, legend)]); rows of two panels.
PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("Closed candles published (klines.v1)", "ops", [
        ("sum by (source) (rate(klinebus_ingest_candles_published_total[5m]))", "{{source}}"),
    ]),
    ("Events per stage", "ops", [
        ('sum(rate(klinebus_features_events_out_total{topic="features.v1"}[5m]))', "features.v1"),
        ('sum(rate(klinebus_inference_events_out_total{topic="predictions.v1"}[5m]))', "predictions.v1"),
        ('sum(rate(klinebus_charts_rendered_total[5m]))', "charts.v1"),
        ('sum(rate(klinebus_archive_rows_written_total[5m]))', "archived rows"),
    ]),
    ("Dead letters by service and reason", "ops", [
        ('sum by (job, reason) (rate({__name__=~"klinebus_.*_dead_letters_total"}[5m]))', "{{job}} {{reason}}"),
    ]),
    ("Duplicates skipped (re-deliveries, replays)", "ops", [
        ('sum by (job, topic) (rate({__name__=~"klinebus_.*_duplicates_total"}[5m]))', "{{job}} {{topic}}"),
    ]),
    ("Gaps found and backfilled, by cause", "short", [
        ("sum by (reason) (increase(klinebus_ingest_gaps_total[1h]))", "{{reason}}"),
        ("sum(increase(klinebus_ingest_backfill_failures_total[1h]))", "backfill failures"),
    ]),
    ("Websocket connections", "short", [
        ("sum(klinebus_ingest_ws_connections)", "open"),
        ("sum by (cause) (increase(klinebus_ingest_ws_disconnects_total[1h]))", "ended: {{cause}}"),
    ]),
    ("Exchange REST weight and throttling", "short", [
        ("max(klinebus_ingest_rest_used_weight)", "used weight (of 6000/min)"),
        ("sum(increase(klinebus_ingest_rest_throttled_total[1h]))", "429/418 answers"),
    ]),
    ("Close-to-publish latency (ingest) p50 / p99", "s", [
        ("histogram_quantile(0.5, sum by (le) (rate(klinebus_ingest_receive_to_publish_seconds_bucket[5m])))", "p50"),
        ("histogram_quantile(0.99, sum by (le) (rate(klinebus_ingest_receive_to_publish_seconds_bucket[5m])))", "p99"),
    ]),
    ("Handle time per event p95, by service", "s", [
        ('histogram_quantile(0.95, sum by (job, le) (rate({__name__=~"klinebus_.*_handle_seconds_bucket"}[5m])))', "{{job}}"),
    ]),
    ("Charts: render time p95 and skips", "s", [
        ("histogram_quantile(0.95, sum by (le) (rate(klinebus_charts_render_seconds_bucket[5m])))", "render p95"),
        ("sum by (why) (increase(klinebus_charts_skipped_total[1h]))", "skipped: {{why}}"),
    ]),
    ("Features: streams with state, warm-up and gaps", "short", [
        ("sum(klinebus_features_keys)", "streams"),
        ("sum(increase(klinebus_features_warmup_candles_total[1h]))", "warm-up candles"),
        ("sum(increase(klinebus_features_gaps_total[1h]))", "gaps seen"),
    ]),
    ("Pods not ready", "short", [
        ('count(up{namespace="klinebus"} == 0) or vector(0)', "down"),
    ]),
]


def build() -> dict:
    panels = []
    for i, (title, unit, targets) in enumerate(PANELS):
        panels.append({
            "id": i + 1,
            "type": "timeseries",
            "title": title,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [
                {"refId": chr(65 + j), "expr": expr, "legendFormat": legend} for j, (expr, legend) in enumerate(targets)
            ],
        })
    return {
        "uid": "klinebus-overview",
        "title": "klinebus overview",
        "tags": ["klinebus"],
        "timezone": "utc",
        "schemaVersion": 39,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus"}]},
        "panels": panels,
    }


if __name__ == "__main__":
    OUT.write_text(json.dumps(build(), indent=2) + "\n")
    print(f"wrote {OUT}")
