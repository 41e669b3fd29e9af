"""Train on real shipped candles for a few steps, export ONNX, package, publish, evaluate."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from klinebus.cli import main
from libs.common.model_package import MODEL_FILE, Registry, package_digest, sha256_file, verify_package

from .conftest import BTC_15M

pytestmark = pytest.mark.slow


def test_package_is_complete_and_verified(trained_bilstm):
    registry, result = trained_bilstm
    reg = Registry(str(registry))
    assert reg.models() == ["bilstm-ohlc-BTCUSDT-15m"]
    meta = reg.verify("bilstm-ohlc-BTCUSDT-15m", "1", expected_sha256=result.published.sha256)
    assert meta.kind == "bilstm-ohlc" and meta.feature_set == "bilstm-13-v1" and meta.lookback == 60
    assert meta.inputs[0].shape == ["batch", 60, 13] and meta.outputs[0].shape == ["batch", 1, 4]
    assert meta.input_scaling == "in-graph" and meta.serves[0].symbol == "BTCUSDT"
    assert meta.ranges.train.end < meta.ranges.validation.start < meta.ranges.test.start
    assert set(meta.baseline_metrics) >= {"persistence", "drift", "majority_direction"}
    assert meta.config["loop"]["epochs"] == 2 and meta.config["batch_size"] == 32
    # the promotion decision follows the rule, whatever the numbers: a significant win on the gate
    # slice (mae and the next close), no loss on the later test slice
    v = meta.evaluation["verdicts"]
    assert [x["metric"] for x in v["gate"]] == [x["metric"] for x in v["test"]] == ["mae", "close@1_mae"]
    gate_wins = all(x["model_mae"] < x["baseline_mae"] and x["dm_p_value"] < 0.05 for x in v["gate"])
    test_holds = all(x["model_mae"] <= x["baseline_mae"] for x in v["test"])
    assert meta.promoted == (gate_wins and test_holds)
    assert ("does not beat" in meta.promotion_reason) == (not gate_wins)
    assert "DM-HLN" in meta.promotion_reason and meta.config["dm_alpha"] == 0.05
    # the selection slices (validation + gate) end before the test slice starts
    assert meta.ranges.validation.end == meta.config["dataset"]["ranges"]["gate"]["end"]
    assert result.export_check["max_rel_diff"] <= 1e-4 and result.export_check["samples"] == 64


def test_card_shows_every_metric_beside_persistence(trained_bilstm):
    registry, result = trained_bilstm
    card = (registry / "bilstm-ohlc-BTCUSDT-15m" / "1" / "README.md").read_text()
    assert card.startswith("---\n") and "\n---\n" in card[4:]
    assert "| metric | model | persistence | drift | majority_direction |" in card
    assert f"**Promoted: {'yes' if result.published.meta.promoted else 'no'}.**" in card
    assert "Walk-forward" in card and "# bilstm-ohlc-BTCUSDT-15m v1" in card
    v = result.published.meta.evaluation["verdicts"]["gate"][0]
    assert "| gate | mae | persistence |" in card and "| gate | mae | drift |" in card and f"{v['dm_p_value']:.3g} |" in card  # the DM p-value is on the card
    assert "80 % prediction intervals" in card


def test_gate_verdict_and_intervals_match_hand_computation(trained_bilstm, bilstm_dataset):
    """Gate MAEs recomputed from the package's graph and the candles; coverage from the stored quantiles."""
    registry, result = trained_bilstm
    pkg = registry / "bilstm-ohlc-BTCUSDT-15m" / "1"
    meta = verify_package(pkg)
    m = json.loads((bilstm_dataset / "manifest.json").read_text())
    z = np.load(bilstm_dataset / m["series"][0]["file"])
    feats, prices = z["features"], z["prices"]
    sess = ort.InferenceSession(str(pkg / MODEL_FILE), providers=["CPUExecutionProvider"])
    order = [1, 3, 1, 2]  # targets open, close, high, low -> price columns (open's persistence: last close)

    def run(a):
        (out,) = sess.run(None, {"features": feats[a[:, None] + np.arange(-59, 1)[None, :]]})
        actual = prices[a + 1][:, [0, 3, 1, 2]]
        pers = prices[a][:, [3, 3, 1, 2]]
        return out[:, 0, :], actual, pers

    fi = [m["features"].index(c) for c in ("high", "low", "close")]

    def scale(a):  # exp(mean log relative range) of the last 16 input candles, by hand
        w = feats[a[:, None] + np.arange(-15, 1)[None, :]]
        return np.exp(np.mean(np.log((w[..., fi[0]] - w[..., fi[1]]) / w[..., fi[2]]), axis=1))[:, None]

    pred, actual, pers = run(z["anchors_gate"])
    g = meta.evaluation["verdicts"]["gate"][0]
    assert g["n"] == len(z["anchors_gate"])
    assert g["model_mae"] == pytest.approx(np.abs(pred - actual).mean(), rel=1e-9)
    assert g["baseline_mae"] == pytest.approx(np.abs(pers - actual).mean(), rel=1e-9)
    assert g["mae_ratio_ci_low"] <= g["mae_ratio"] <= g["mae_ratio_ci_high"]
    assert 0.0 <= g["dm_p_value"] <= 1.0
    iv = meta.config["intervals"]
    assert iv["columns"] == ["open@1", "close@1", "high@1", "low@1"] and iv["calibrated_on"] == "gate"
    assert iv["scale"]["candles"] == 16
    q = np.asarray(iv["log_residual_quantiles"])
    assert q.shape == (4, 3) and np.all(q[:, 0] <= q[:, 1]) and np.all(q[:, 1] <= q[:, 2])
    # on the calibration slice itself a split-conformal 10-90 % band covers at least 80 % - 1/n
    s = scale(z["anchors_gate"])
    inside_gate = (actual >= pred * np.exp(q[:, 0] * s)) & (actual <= pred * np.exp(q[:, 2] * s))
    assert inside_gate.mean(axis=0).min() >= 0.8 - 1 / len(pred)
    pred, actual, _ = run(z["anchors_test"])
    s = scale(z["anchors_test"])
    inside = (actual >= pred * np.exp(q[:, 0] * s)) & (actual <= pred * np.exp(q[:, 2] * s))
    for j, col in enumerate(iv["columns"]):
        assert meta.evaluation["intervals"][col]["model"]["coverage"] == pytest.approx(inside[:, j].mean())
    del order


def test_onnx_runs_real_windows_with_any_batch_and_metrics_match_hand_computed(trained_bilstm, bilstm_dataset):
    registry, result = trained_bilstm
    pkg = registry / "bilstm-ohlc-BTCUSDT-15m" / "1"
    meta = verify_package(pkg)
    m = json.loads((bilstm_dataset / "manifest.json").read_text())
    z = np.load(bilstm_dataset / m["series"][0]["file"])
    a, feats, prices = z["anchors_test"], z["features"], z["prices"]
    windows = feats[a[:, None] + np.arange(-59, 1)[None, :]]
    sess = ort.InferenceSession(str(pkg / MODEL_FILE), providers=["CPUExecutionProvider"])
    (all_out,) = sess.run(None, {"features": windows})
    (one,) = sess.run(None, {"features": windows[5:6]})
    np.testing.assert_allclose(one[0], all_out[5], rtol=1e-12)
    assert all_out.shape == (len(a), 1, 4)
    last_close = prices[a, 3]
    assert np.all(np.abs(all_out[:, 0, :] / last_close[:, None] - 1) < 0.5)  # prices, near the last close
    # test metrics, computed here from the raw candles (open, close, high, low order of the heads)
    actual = prices[a + 1][:, [0, 3, 1, 2]]
    assert meta.metrics["mae"] == pytest.approx(np.mean(np.abs(all_out[:, 0, :] - actual)), rel=1e-9)
    persistence = np.stack([last_close, last_close, prices[a, 1], prices[a, 2]], axis=1)
    assert meta.baseline_metrics["persistence"]["mae"] == pytest.approx(np.mean(np.abs(persistence - actual)), rel=1e-9)
    assert meta.baseline_metrics["persistence"]["close@1_mae"] == pytest.approx(
        np.mean(np.abs(prices[a + 1, 3] - last_close)), rel=1e-9)
    event = result.event()
    # models.v1 announces the package digest (its manifest's sha256); klinebus.json keeps model.onnx's
    assert event.uri == str(pkg) and event.sha256 == package_digest(pkg) and event.promoted == meta.promoted
    assert meta.sha256 == sha256_file(pkg / MODEL_FILE) != event.sha256
    assert event.baseline_metrics["persistence"]["mae"] == meta.baseline_metrics["persistence"]["mae"]


def test_evaluate_scores_only_unseen_windows(trained_bilstm, capsys):
    registry, _ = trained_bilstm
    pkg = registry / "bilstm-ohlc-BTCUSDT-15m" / "1"
    assert main(["evaluate", "--model", str(pkg), "--input", str(BTC_15M), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    meta = verify_package(pkg)
    assert out["samples"] > 0 and out["skipped_seen"] > 0
    assert out["start"] > meta.ranges.validation.end
    assert out["scorecard"]["model"]["samples"] == out["samples"]
    assert main(["evaluate", "--model", str(pkg), "--input", str(BTC_15M)]) == 0
    text = capsys.readouterr().out
    assert "persistence" in text and "fold 1" in text


def test_a_broken_package_is_refused_in_one_line(trained_bilstm, tmp_path, capsys):
    registry, _ = trained_bilstm
    broken = tmp_path / "broken"
    shutil.copytree(registry / "bilstm-ohlc-BTCUSDT-15m" / "1", broken)
    (broken / MODEL_FILE).write_bytes((broken / MODEL_FILE).read_bytes()[:1000])
    assert main(["evaluate", "--model", str(broken), "--input", str(BTC_15M)]) == 2
    err = capsys.readouterr().err
    assert "sha256" in err and len(err.strip().splitlines()) == 1


def test_cli_trains_lstm_close_and_versions_grow(tmp_path, capsys):
    ds = tmp_path / "ds"
    assert main(["dataset", "build", "--kind", "lstm-close", "--input", str(BTC_15M), "--lookback", "30",
                 "--horizon", "3", "--out", str(ds)]) == 0
    capsys.readouterr()
    for expected in ("1", "2"):
        assert main(["train", "--dataset", str(ds), "--registry", str(tmp_path / "reg"), "--epochs", "1",
                     "--max-batches", "2", "--device", "cpu", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["event"]["model"] == "lstm-close-BTCUSDT-15m" and out["event"]["version"] == expected
    assert set(out["scorecards"]["test"]["model"]) >= {"close@1_mae", "close@2_mae", "close@3_mae", "direction_accuracy"}
    assert out["fit"]["device"] == "cpu"
    assert Registry(str(tmp_path / "reg")).versions("lstm-close-BTCUSDT-15m") == ["1", "2"]
