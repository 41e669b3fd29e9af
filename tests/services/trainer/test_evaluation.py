"""Scorecards and the promotion rule, on hand-checked numbers."""

from __future__ import annotations

import numpy as np
import pytest

from services.trainer.evaluation import (
    classification_scorecard,
    forecast_scorecard,
    promotion,
    walk_forward,
    wilson_interval,
)


def test_wilson_interval_known_values():
    # Wilson (1927) / Newcombe (1998) table: 81 of 263 -> 0.2553 .. 0.3662
    lo, hi = wilson_interval(81, 263)
    assert lo == pytest.approx(0.2553, abs=5e-4) and hi == pytest.approx(0.3662, abs=5e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=5e-4)
    assert all(np.isnan(wilson_interval(0, 0)))


def _case():
    # three anchors; last candle (open, high, low, close) and the next close
    last = np.array([[100.0, 102.0, 99.0, 101.0], [101.0, 104.0, 100.0, 103.0], [103.0, 103.5, 98.0, 99.0]])
    actual = np.array([[[102.0]], [[103.0]], [[97.0]]])  # up, flat, down
    pred = np.array([[[101.5]], [[104.0]], [[100.0]]])  # up, up, up
    return last, actual, pred


def test_forecast_scorecard_beside_baselines():
    last, actual, pred = _case()
    card = forecast_scorecard(pred, actual, last, ["close"], [1], drift=np.array([[0.01]]), train_up_share=0.4)
    assert card["model"]["mae"] == pytest.approx((0.5 + 1.0 + 3.0) / 3)
    assert card["persistence"]["mae"] == pytest.approx((1.0 + 0.0 + 2.0) / 3)  # next close = last close
    drift_pred = np.array([101.0, 103.0, 99.0]) * np.exp(0.01)
    assert card["drift"]["mae"] == pytest.approx(np.mean(np.abs(drift_pred - [102.0, 103.0, 97.0])))
    assert card["model"]["mape"] == pytest.approx(np.mean([0.5 / 102, 1 / 103, 3 / 97]) * 100)
    # direction counts the two candles that moved: up (hit) and down (miss); one of three was flat
    assert card["model"]["direction_accuracy"] == 0.5 and card["model"]["direction_n"] == 2
    assert card["model"]["flat_share"] == pytest.approx(1 / 3)
    # the train slice went down more often: the majority baseline always says down
    assert card["majority_direction"]["up"] == 0.0 and card["majority_direction"]["direction_accuracy"] == 0.5
    assert "direction_accuracy" not in card["persistence"]


def test_ohlc_persistence_and_range_error():
    last = np.array([[100.0, 110.0, 95.0, 105.0]])
    actual = np.array([[[105.0, 107.0, 112.0, 101.0]]])  # open, close, high, low
    card = forecast_scorecard(actual, actual, last, ["open", "close", "high", "low"], [1], np.zeros((1, 4)), 0.5)
    assert card["model"]["mae"] == 0 and card["model"]["range_mae"] == 0
    p = card["persistence"]
    assert p["open@1_mae"] == 0.0 and p["close@1_mae"] == 2.0  # open and close persist the last close
    assert p["high@1_mae"] == 2.0 and p["low@1_mae"] == 6.0  # high and low persist their own last values
    assert p["range_mae"] == abs((110 - 95) - (112 - 101))


def test_promotion_rule_and_reason():
    ok, why = promotion({"model": {"mae": 1.0}, "persistence": {"mae": 2.0}})
    assert ok and "beats persistence" in why and "promoted" in why
    ok, why = promotion({"model": {"mae": 2.0}, "persistence": {"mae": 2.0}})
    assert not ok and "does not beat" in why and "not promoted" in why
    ok, _ = promotion({"model": {"mae": float("nan")}, "persistence": {"mae": 2.0}})
    assert not ok
    # better on average (its high/low heads) but worse on the next close: not promoted
    card = {"model": {"mae": 50.0, "close@1_mae": 78.2}, "persistence": {"mae": 57.6, "close@1_mae": 78.0}}
    ok, why = promotion(card, also=["close@1_mae"])
    assert not ok and "validation mae 50 beats" in why and "close@1_mae 78.2 does not beat" in why
    ok, _ = promotion({"model": {"accuracy": 0.6}, "majority_class": {"accuracy": 0.5}}, "accuracy",
                      "majority_class", lower_is_better=False)
    assert ok


def test_walk_forward_folds_are_consecutive():
    t = np.arange(100)[::-1].copy()  # given out of order
    folds = walk_forward(t, 3, lambda idx: {"n": len(idx), "first": int(t[idx].min())})
    assert [f["card"]["n"] for f in folds] == [34, 33, 33]
    assert [f["start"] for f in folds] == [0, 34, 67] and folds[-1]["end"] == 99


def test_classification_scorecard_majority():
    card = classification_scorecard(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), np.array([2, 2, 1]), 3)
    assert card["model"]["accuracy"] == 0.75
    assert card["majority_class"]["class"] == 2.0 and card["majority_class"]["accuracy"] == 0.5
