"""Scorecard arithmetic on hand-made answers (every expected number worked by hand)."""

from __future__ import annotations

import pandas as pd
import pytest

from services.trainer.advice import scorecard as S

ACTUAL = ["BUY", "BUY", "NOOP", "NOOP", "NOOP", "SELL"]
PREDICTED = ["BUY", "SELL", "NOOP", "NOOP", "BUY", None]  # the last answer did not parse
ACTUAL_CHANGE = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
PREDICTED_CHANGE = [1.5, 2.0, 3.0, 5.0, 5.0, None]


def test_accuracy_confusion_and_per_class():
    s = S.score(ACTUAL, PREDICTED, ACTUAL_CHANGE, PREDICTED_CHANGE)
    assert s["n"] == 6 and s["correct"] == 3 and s["invalid"] == 1
    assert s["accuracy"] == 0.5
    # Wilson, 3 of 6, z = 1.96: centre 0.5, half-width 1.96*sqrt(0.25/6 + 3.8415/144)/1.64025 = 0.3124
    assert s["accuracy_ci"] == pytest.approx((0.1876, 0.8124), abs=1e-4)
    assert s["confusion"] == {
        "BUY": {"BUY": 1, "NOOP": 0, "SELL": 1, "INVALID": 0},
        "NOOP": {"BUY": 1, "NOOP": 2, "SELL": 0, "INVALID": 0},
        "SELL": {"BUY": 0, "NOOP": 0, "SELL": 0, "INVALID": 1},
    }
    buy, noop, sell = (s["per_class"][c] for c in ("BUY", "NOOP", "SELL"))
    assert (buy["actual"], buy["predicted"], buy["matches"]) == (2, 2, 1)
    assert (buy["precision"], buy["recall"]) == (0.5, 0.5)
    assert (noop["actual"], noop["predicted"], noop["matches"]) == (3, 2, 2)
    assert noop["precision"] == 1.0 and noop["recall"] == pytest.approx(2 / 3)
    assert (sell["actual"], sell["predicted"], sell["matches"]) == (1, 1, 0)
    assert sell["precision"] == 0.0 and sell["recall"] == 0.0
    # Wilson at 2 of 2: lower bound 2/(2 + 3.8415) = 0.3424, upper 1
    assert noop["precision_ci"] == pytest.approx((0.3424, 1.0), abs=1e-4)


def test_mae_and_its_interval_leave_out_unparsed_answers():
    s = S.score(ACTUAL, PREDICTED, ACTUAL_CHANGE, PREDICTED_CHANGE)
    # errors 0.5, 0, 0, 1, 0 -> mean 0.3; sample sd sqrt(0.8/4) = 0.4472; se 0.2; 1.96 * 0.2 = 0.392
    assert s["mae_n"] == 5
    assert s["mae"] == pytest.approx(0.3)
    assert s["mae_ci"] == pytest.approx((0.3 - 0.392, 0.3 + 0.392), abs=1e-3)


def test_a_class_never_predicted_has_no_precision():
    s = S.score(["BUY", "SELL"], ["NOOP", "NOOP"], [0.0, 0.0], [0.0, 0.0])
    assert s["per_class"]["BUY"]["precision"] is None and s["per_class"]["BUY"]["precision_ci"] is None
    assert s["accuracy"] == 0.0 and s["accuracy_ci"][0] == 0.0


def _items(advice, prev, ids=None):
    n = len(advice)
    return pd.DataFrame({
        "id": ids or [f"X:{i}" for i in range(n)], "symbol": ["X"] * n, "advice": advice,
        "open_change": [float(i) for i in range(n)], "prev_advice": prev,
        "prev_open_change": [float(i) - 1 for i in range(n)],
    })


def test_baselines_learn_from_train_and_score_the_same_items():
    # training says SELL is most common; the verify items are mostly NOOP: majority must say SELL
    train = pd.DataFrame({"advice": ["SELL"] * 3 + ["NOOP"] * 2, "open_change": [-3.0, -2.0, -1.0, 0.0, 10.0]})
    items = _items(["NOOP", "NOOP", "SELL", "BUY"], ["NOOP", "SELL", "SELL", "NOOP"])
    answers = {i: {"advice": "NOOP", "predicted_open_change": 0.0, "seconds": 0.5} for i in items["id"][:3]}
    card = S.scorecard(items, answers, train, seed=1, model_name="m")
    assert card["n"] == 3  # only answered items are scored, the baselines on exactly those
    maj = card["baselines"]["majority"]
    assert maj["label"] == "majority (SELL)" and maj["correct"] == 1 and maj["n"] == 3
    assert maj["mae"] == pytest.approx((1 + 2 + 3) / 3)  # train median change -1 vs actual 0, 1, 2
    last = card["baselines"]["last_minute"]
    assert last["correct"] == 2  # NOOP/NOOP and SELL/SELL; NOOP vs SELL wrong
    assert last["mae"] == pytest.approx(1.0)  # prev change is always one below
    assert card["model"]["correct"] == 2 and card["model"]["seconds_per_item"] == 0.5


def test_random_baseline_is_uniform_and_reproducible():
    n = 3000
    train = pd.DataFrame({"advice": ["NOOP"] * 10, "open_change": [0.0] * 10})
    items = _items(["NOOP"] * n, ["NOOP"] * n)
    a = S.baselines(items, train, seed=5)["random"]["advice"]
    b = S.baselines(items, train, seed=5)["random"]["advice"]
    c = S.baselines(items, train, seed=6)["random"]["advice"]
    assert a == b and a != c
    for advice in ("BUY", "NOOP", "SELL"):
        assert 0.30 < a.count(advice) / n < 0.37


def test_rendered_card_shows_the_seed_table_and_every_baseline():
    train = pd.DataFrame({"advice": ["NOOP"] * 5, "open_change": [0.0] * 5})
    items = _items(ACTUAL, ["NOOP"] * 6)
    answers = {i: {"advice": p, "predicted_open_change": c, "seconds": 1.0}
               for i, p, c in zip(items["id"], PREDICTED, PREDICTED_CHANGE)}
    text = S.render(S.scorecard(items, answers, train, seed=1, model_name="tiny.gguf"))
    for label in ("tiny.gguf", "random (uniform)", "majority (NOOP)", "same as last minute"):
        assert label in text
    assert "50.0% [18.8, 81.2]" in text
    assert "BUY            2          2        1" in text  # actual, predicted, matches
    assert "seconds per item: 1.000" in text


def test_a_sampled_run_also_shows_the_baselines_on_the_whole_split(small_dataset, tmp_path):
    from services.trainer.advice import evaluate as E

    class Noop:
        name, fingerprint = "noop.gguf", "noop"

        def answer(self, messages):
            return '{"predicted_open_change":"0.00000000","advice":"NOOP"}'

    verify = pd.read_parquet(small_dataset / "verify.parquet")
    card = E.evaluate(Noop(), small_dataset, limit=7, results=tmp_path / "r.jsonl").card
    whole = card["baselines_whole_split"]
    assert card["n"] == 7 and whole["majority"]["n"] == len(verify)
    assert whole["last_minute"]["correct"] == int((verify["advice"] == verify["prev_advice"]).sum())
    assert "baselines on the whole verify split" in S.render(card)
