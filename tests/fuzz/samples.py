"""One valid event per topic, as a producer would write it (values from real candles of
data/klines where a candle is involved). Seeds of the mutation fuzz and of the ACL test."""

from __future__ import annotations

from libs.common import topics

OPEN = 1_680_307_200_000  # 2023-04-01 00:00 UTC
MIN = 60_000

SAMPLES: dict[str, dict] = {
    topics.KLINES: {
        "symbol": "BTCUSDT", "interval": "1m", "open_time": OPEN, "close_time": OPEN + MIN - 1,
        "open": 28473.63, "high": 28482.69, "low": 28467.0, "close": 28477.2, "volume": 33.61,
        "quote_volume": 957110.95, "trades": 1423, "taker_buy_base": 15.2, "taker_buy_quote": 432850.1,
        "source": "ws", "ingested_at": OPEN + MIN + 120,
    },
    topics.KLINES_LIVE: {
        "symbol": "BTCUSDT", "interval": "1m", "open_time": OPEN, "close_time": OPEN + MIN - 1,
        "open": 28473.63, "high": 28482.69, "low": 28467.0, "close": 28477.2, "volume": 10.0,
        "source": "ws", "ingested_at": OPEN + 3000, "closed": False,
    },
    topics.FEATURES: {
        "symbol": "BTCUSDT", "interval": "1m", "open_time": OPEN, "close": 28477.2, "feature_set": "skeleton-v1",
        "values": {"rsi_14": 55.1, "ema_12": 28470.2, "macd": 3.4}, "warm": True,
        "kline_ingested_at": OPEN + MIN + 120, "computed_at": OPEN + MIN + 130,
    },
    topics.CHART_REQUESTS: {"symbol": "BTCUSDT", "interval": "1m", "window": 120, "preset": "analysis",
                            "requested_by": "operator", "requested_at": OPEN},
    topics.CHARTS: {
        "symbol": "BTCUSDT", "interval": "1m", "open_time": OPEN, "uri": "file:///var/charts/BTCUSDT/1m/x.png",
        "window": 120, "first_open_time": OPEN - 119 * MIN, "preset": "analysis", "width": 1280, "height": 960,
        "indicators": {"rsi_14": 55.1}, "patterns": ["hammer"], "rendered_at": OPEN + MIN + 500,
    },
    topics.PREDICTIONS: {
        "symbol": "BTCUSDT", "interval": "1m", "open_time": OPEN, "model": "persistence", "model_version": "0",
        "target_open_time": OPEN + MIN, "horizon": 1, "predicted": {"close": 28477.2}, "last_close": 28477.2,
        "predicted_at": OPEN + MIN + 140,
    },
    topics.SCORES: {
        "symbol": "BTCUSDT", "interval": "1m", "open_time": OPEN + MIN, "model": "persistence", "model_version": "0",
        "horizon": 1, "forecast_open_time": OPEN, "predicted_close": 28477.2, "actual_close": 28480.0,
        "baseline_close": 28477.2, "abs_error": 2.8, "baseline_abs_error": 2.8, "direction_hit": True, "window": 1,
        "rolling_mae": 2.8, "rolling_baseline_mae": 2.8, "mae_ratio": 1.0, "scored_at": OPEN + 2 * MIN,
    },
    topics.ANALYSES: {
        "symbol": "BTCUSDT", "interval": "1m", "open_time": OPEN, "chart_uri": "file:///var/charts/x.png",
        "model": "qwen2.5-vl-7b", "trend": "bullish", "confidence": 0.7, "support": [28400.0],
        "resistance": [28550.0], "patterns": ["hammer"], "summary": "Higher lows.", "signal": "buy",
    },
    topics.ALERTS: {
        "rule": "behind-persistence", "severity": "warning", "symbol": "BTCUSDT", "interval": "1m",
        "open_time": OPEN, "message": "model behind persistence", "value": 1.2, "threshold": 1.1,
        "labels": {"model": "lstm"}, "fired_at": OPEN + MIN, "status": "firing",
    },
    topics.DATASETS: {
        "request_id": "r-1", "model_kind": "lstm-close", "symbols": ["BTCUSDT"], "intervals": ["1m"],
        "start": OPEN - 30 * 24 * 3600_000, "end": OPEN, "feature_set": "skeleton-v1", "horizon": 1,
        "requested_at": OPEN,
    },
    topics.MODELS: {
        "model": "lstm-close-BTCUSDT-1m", "version": "1", "uri": "file:///var/registry/lstm/1",
        "sha256": "0" * 64, "feature_set": "skeleton-v1", "train_range": [OPEN - 10 * MIN, OPEN - 5 * MIN],
        "eval_range": [OPEN - 5 * MIN, OPEN], "metrics": {"mae": 1.0}, "baseline_metrics": {"persistence": {"mae": 1.1}},
        "promoted": True, "published_at": OPEN,
    },
    topics.DEAD_LETTERS: {"source": "klines.v1", "service": "features", "reason": "malformed JSON", "payload": "{",
                          "received_at": OPEN},
}
