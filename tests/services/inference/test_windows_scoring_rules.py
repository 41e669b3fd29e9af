"""Windows, live scoring and market alert rules: the pure domain parts, on real features."""

from __future__ import annotations

import numpy as np
import pytest

from services.inference.alert_rules import AlertEngine, RulesError, load_rules, parse_rules
from services.inference.scoring import LiveScorer
from services.inference.windows import GAP, MISMATCH, NOT_WARM, TOO_FEW_CANDLES, Request, Windows
from tests.services.inference.models import feature_events, window_of

REQ = Request("skeleton-v1", ("rsi_14", "close"), 3)
KEY = ("BTCUSDT", "15m")
M15 = 15 * 60_000


def push(w: Windows, ev) -> bool:
    return w.push(ev.symbol, ev.interval, ev.open_time, ev.close, ev.feature_set, ev.values)


def test_windows_hold_the_last_lookback_vectors_in_the_models_column_order():
    events = feature_events(40)
    w = Windows(3)
    for ev in events[:30]:
        assert push(w, ev)
    win, last_close, reason = w.window(KEY, REQ)
    assert reason == "" and last_close == events[29].close
    np.testing.assert_array_equal(win, window_of(events, 29, ("rsi_14", "close"), 3))
    assert not push(w, events[29]) and not push(w, events[10])  # re-delivery, older candle
    np.testing.assert_array_equal(w.window(KEY, REQ)[0], win)


def test_values_land_in_the_feature_set_s_column_order_whatever_the_payload_s_key_order():
    """A payload is a JSON object: its key order is the producer's. A value missing from it (a
    stream not yet warm for that indicator) is NaN, so no window includes it."""
    w = Windows(1)
    req = Request("skeleton-v1", ("rsi_14", "close", "sma_20"), 1)
    w.push("BTCUSDT", "15m", 0, 10.0, "skeleton-v1", {"sma_20": 3.0, "rsi_14": 1.0, "ema_20": 4.0, "close": 2.0})
    assert w.window(KEY, req)[0].tolist() == [[1.0, 2.0, 3.0]]
    w.push("BTCUSDT", "15m", M15, 10.0, "skeleton-v1", {"sma_20": 3.5, "close": 2.5, "ema_20": 4.5, "volume": 9.0})
    assert w.window(KEY, req)[2] == NOT_WARM  # rsi_14 missing, though four values came
    assert w.window(KEY, Request("skeleton-v1", ("close", "sma_20"), 1))[0].tolist() == [[2.5, 3.5]]


def test_no_window_until_every_candle_in_it_is_warm_and_enough_have_been_seen():
    events = feature_events(25)
    w = Windows(3)
    push(w, events[0])
    assert w.window(KEY, REQ)[2] == TOO_FEW_CANDLES
    for ev in events[1:21]:
        push(w, ev)
    assert not events[18].warm and events[19].warm
    assert w.window(KEY, REQ)[2] == NOT_WARM  # candles 18..20: 18 is cold
    push(w, events[21])
    assert w.window(KEY, REQ)[2] == ""
    # The close-only request (persistence) needs no warm features.
    assert w.window(KEY, Request("", ("close",), 1))[0].tolist() == [[events[21].close]]


def test_a_window_across_a_missing_candle_is_refused_until_the_gap_leaves_it():
    events = feature_events(40)
    w = Windows(3)
    for ev in events[:30] + events[31:33]:  # candle 30 never came
        push(w, ev)
    assert w.window(KEY, REQ)[2] == GAP  # 29, 31, 32
    push(w, events[33])
    np.testing.assert_array_equal(w.window(KEY, REQ)[0], window_of(events, 33, ("rsi_14", "close"), 3))


def test_a_stream_of_another_feature_set_is_a_mismatch_unless_it_holds_the_models_inputs():
    chart = feature_events(40, feature_set="chart-analysis-v1")  # has close and rsi_14, not ema_20... check both
    w = Windows(3)
    for ev in chart:
        push(w, ev)
    assert w.window(KEY, REQ)[2] == ""  # chart-analysis-v1 carries rsi_14 and close: same kernels, same values
    np.testing.assert_array_equal(w.window(KEY, REQ)[0], window_of(chart, 39, ("rsi_14", "close"), 3))
    needs_hv = Request("bilstm-13-v1", ("close", "hv_20"), 3)
    assert w.window(KEY, needs_hv)[2] == MISMATCH
    strict = Windows(3, allow_superset=False)
    for ev in chart:
        push(strict, ev)
    assert strict.window(KEY, REQ)[2] == MISMATCH


def test_growing_a_window_keeps_its_rows_and_refill_puts_older_ones_in_front():
    events = feature_events(40)
    w = Windows(3)
    for ev in events[30:]:
        push(w, ev)
    assert w.grow(6)
    assert w.window(KEY, Request("skeleton-v1", ("close",), 6))[2] == TOO_FEW_CANDLES
    w.refill(KEY, [(e.open_time, e.close, e.feature_set, e.values) for e in events[:39]])  # overlaps what is held
    win = w.window(KEY, Request("skeleton-v1", ("close",), 6))[0]
    np.testing.assert_array_equal(win, window_of(events, 39, ("close",), 6))


def test_scores_compare_each_forecast_with_persistence_in_either_arrival_order():
    s = LiveScorer(window=3, min_samples=2)
    # Forecast made at candle 0 (close 100) for candle 1: predicted 103.
    assert s.add_forecast("m", "1", "BTCUSDT", "15m", 0, 100.0, [(1, M15, 103.0)]) == []
    (a,) = s.add_truth("BTCUSDT", "15m", M15, 102.0)
    assert (a.abs_error, a.baseline_abs_error, a.direction_hit, a.n) == (1.0, 2.0, True, 1)
    # The truth of candle 2 arrives before the (slow) forecast that targets it: scored on arrival.
    assert s.add_truth("BTCUSDT", "15m", 2 * M15, 101.0) == []
    (b,) = s.add_forecast("m", "1", "BTCUSDT", "15m", M15, 102.0, [(1, 2 * M15, 104.0)])
    assert (b.abs_error, b.baseline_abs_error, b.direction_hit) == (3.0, 1.0, False)
    assert (b.n, b.mae, b.baseline_mae) == (2, 2.0, 1.5)
    assert b.mae_ratio == pytest.approx(2.0 / 1.5) and b.direction_accuracy == 0.5 and b.behind
    # A flat market has no direction: left out of the hit rate.
    s.add_forecast("m", "1", "BTCUSDT", "15m", 2 * M15, 101.0, [(1, 3 * M15, 99.0)])
    (c,) = s.add_truth("BTCUSDT", "15m", 3 * M15, 101.0)
    assert c.direction_hit is None and c.direction_accuracy == 0.5
    # The rolling window forgets the oldest score (window=3).
    s.add_forecast("m", "1", "BTCUSDT", "15m", 3 * M15, 101.0, [(1, 4 * M15, 101.0)])
    (d,) = s.add_truth("BTCUSDT", "15m", 4 * M15, 101.5)
    assert d.n == 3 and d.mae == pytest.approx((3.0 + 2.0 + 0.5) / 3)


def test_multi_step_forecasts_are_scored_per_horizon_as_each_target_closes():
    s = LiveScorer(window=10, min_samples=1)
    s.add_forecast("path", "1", "ETHUSDT", "1h", 0, 10.0, [(1, 3_600_000, 11.0), (2, 7_200_000, 12.0)])
    (h1,) = s.add_truth("ETHUSDT", "1h", 3_600_000, 10.5)
    (h2,) = s.add_truth("ETHUSDT", "1h", 7_200_000, 9.0)
    assert (h1.horizon, h1.abs_error, h1.baseline_abs_error) == (1, 0.5, 0.5)
    assert (h2.horizon, h2.abs_error, h2.baseline_abs_error, h2.direction_hit) == (2, 3.0, 1.0, False)
    assert s.behind("path", "ETHUSDT", "1h", 2) and not s.behind("path", "ETHUSDT", "1h", 1)


RULES = {
    "rules": [
        {"name": "rsi", "kind": "rsi", "above": 70, "below": 30, "severity": "info"},
        {"name": "move", "kind": "predicted_move", "threshold_pct": 1.0, "cooldown_candles": 2},
        {"name": "behind", "kind": "model_behind", "ratio": 1.0, "min_samples": 2, "severity": "warning"},
        {"name": "engulfing", "kind": "pattern", "features": ["cdl_engulfing"], "symbols": ["BTCUSDT"]},
    ]
}


def test_a_rules_file_with_mistakes_names_each_one(tmp_path):
    bad = tmp_path / "rules.yaml"
    bad.write_text(
        "rules:\n"
        "  - {name: a, kind: rsi}\n"
        "  - {name: a, kind: predicted_move, threshold_pct: -1, severity: loud}\n"
        "  - {name: c, kind: pattern, features: [rsi_14]}\n"
        "  - {name: d, kind: telepathy}\n"
        "  - {name: e, kind: rsi, above: 20, below: 80, colour: red}\n"
        "  - {name: f, kind: rsi, above: 70, severity: critical}\n"
    )
    with pytest.raises(RulesError) as err:
        load_rules(bad)
    assert err.value.problems == [
        "rules[0] (a): needs above, below or both",
        "rules[1] (a): the name is used twice",
        "rules[1] (a): severity must be one of info, warning, got 'loud'",
        "rules[1] (a): threshold_pct must be a number > 0",
        "rules[2] (c): ['rsi_14'] are not candlestick pattern features (cdl_*)",
        "rules[3] (d): kind must be one of predicted_move, rsi, pattern, model_behind, got 'telepathy'",
        "rules[4] (e): unknown key(s) colour for kind rsi",
        "rules[4] (e): below (80.0) must be less than above (20.0)",
        "rules[5] (f): severity critical is for system alerts (they page); market alerts are info or warning",
    ]
    (tmp_path / "broken.yaml").write_text("rules: [ {name: x\n")
    with pytest.raises(RulesError, match="not valid YAML at line"):
        load_rules(tmp_path / "broken.yaml")


def test_rsi_alerts_fire_once_resolve_when_back_in_range_and_ignore_re_deliveries():
    eng = AlertEngine(parse_rules(RULES))
    fire = eng.on_features("BTCUSDT", "15m", 0, M15, {"rsi_14": 75.0})
    assert [(f.rule.name, f.status, f.value, f.threshold) for f in fire] == [("rsi", "firing", 75.0, 70.0)]
    assert eng.on_features("BTCUSDT", "15m", 0, M15, {"rsi_14": 75.0}) == []  # the same candle again
    assert eng.on_features("BTCUSDT", "15m", M15, M15, {"rsi_14": 80.0}) == []  # still active: no flood
    (res,) = eng.on_features("BTCUSDT", "15m", 2 * M15, M15, {"rsi_14": 50.0})
    assert res.status == "resolved" and res.severity == "info"
    (low,) = eng.on_features("BTCUSDT", "15m", 3 * M15, M15, {"rsi_14": 20.0})
    assert "oversold" in low.message and low.threshold == 30.0


def test_predicted_move_alerts_respect_their_cooldown_and_model_behind_fires_on_scores():
    eng = AlertEngine(parse_rules(RULES))
    (f,) = eng.on_forecast("m", "ETHUSDT", "15m", 0, M15, 100.0, 102.0)
    assert f.status == "firing" and f.value == pytest.approx(2.0) and f.labels["model"] == "m"
    assert eng.on_forecast("m", "ETHUSDT", "15m", M15, M15, 100.0, 100.1)[0].status == "resolved"
    assert eng.on_forecast("m", "ETHUSDT", "15m", 2 * M15, M15, 100.0, 103.0) == []  # within 2 candles of the firing
    assert eng.on_forecast("m", "ETHUSDT", "15m", 3 * M15, M15, 100.0, 103.0)[0].status == "firing"
    assert eng.on_score("m", "ETHUSDT", "15m", M15, M15, 1, n=1, mae_ratio=3.0) == []  # too few scores
    (b,) = eng.on_score("m", "ETHUSDT", "15m", 2 * M15, M15, 1, n=2, mae_ratio=1.5)
    assert b.status == "firing" and b.severity == "warning"
    # A pattern rule limited to BTCUSDT says nothing for ETHUSDT.
    assert eng.on_features("ETHUSDT", "15m", 0, M15, {"cdl_engulfing": 100.0}) == []
    (p,) = eng.on_features("BTCUSDT", "15m", 0, M15, {"cdl_engulfing": -100.0})
    assert "bearish" in p.message


def test_a_pattern_alert_resolves_with_the_labels_it_fired_with_and_the_patterns_in_its_message():
    """Labels are the alert's identity (Alertmanager matches the resolve to the firing by them): the
    patterns found belong in the message, and the resolve still says which pattern had fired."""
    eng = AlertEngine(parse_rules({"rules": [
        {"name": "candles", "kind": "pattern", "features": ["cdl_engulfing", "cdl_hammer"], "severity": "warning"},
    ]}))
    (fired,) = eng.on_features("BTCUSDT", "15m", 0, M15, {"cdl_engulfing": 100.0, "cdl_hammer": 0.0})
    (resolved,) = eng.on_features("BTCUSDT", "15m", M15, M15, {"cdl_engulfing": 0.0, "cdl_hammer": 0.0})
    assert (fired.status, resolved.status) == ("firing", "resolved")
    assert fired.labels == resolved.labels == {"rule": "candles", "kind": "pattern"}
    assert "cdl_engulfing (bullish)" in fired.message
    assert resolved.message.startswith("resolved: ") and "cdl_engulfing (bullish)" in resolved.message
    # Another pattern on a later candle is the same alert again (same labels), its message names it.
    (again,) = eng.on_features("BTCUSDT", "15m", 2 * M15, M15, {"cdl_engulfing": 0.0, "cdl_hammer": -100.0})
    assert again.labels == fired.labels and "cdl_hammer (bearish)" in again.message
