"""The range / volatility forecaster: targets by hand, least squares recovering known coefficients,
the ONNX graph against an independent numpy formula, and the whole job on real candles."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from libs.common.model_package import MODEL_FILE, Registry, verify_package
from services.trainer.datasets import BuildSpec, build_dataset
from services.trainer.range_model import (
    FLOOR,
    LinearLogModel,
    baselines,
    ewma_weights,
    export_onnx,
    fit_ewma_opt,
    fit_har,
    har_design,
    realised_vol,
    targets,
)

from .conftest import BTC_15M


def test_targets_by_hand():
    # o, h, l, c
    p = np.array([[1, 2, 1, 1.0], [1, 3, 1, 2.0], [2, 5, 2, 4.0], [4, 4, 1, 2.0], [2, 3, 2, 2.0]])
    y = targets(p, np.array([1]), 2)
    assert y[0, 0] == 3.0  # next candle: high 5 - low 2
    assert y[0, 1] == pytest.approx(np.sqrt(np.log(2.0) ** 2 + np.log(0.5) ** 2))  # closes 2 -> 4 -> 2
    assert realised_vol(p[:, 3], np.array([2]), 2, ahead=False)[0] == pytest.approx(np.sqrt(2 * np.log(2.0) ** 2))


def test_har_design_and_ewma_weights():
    d = har_design(4, (1, 2, 4))
    np.testing.assert_allclose(d, [[0, 0, 0.25], [0, 0, 0.25], [0, 0.5, 0.25], [1, 0.5, 0.25]])
    np.testing.assert_allclose(ewma_weights(3, 0.5), np.array([0.25, 0.5, 1.0]) / 1.75)


def test_har_least_squares_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    n, L = 4000, 64
    x = rng.normal(-6.0, 0.5, size=(n, L))
    z = x @ har_design(L)
    beta = np.array([0.3, 0.2, 0.1])
    y = -1.0 + z[:, [0, 1, 2]] @ beta + 0.4 * z[:, 3] + 1e-9 * rng.normal(size=n)
    m = fit_har(x, np.stack([y, y], axis=1))
    coef = np.asarray(m.params["coef"])[:, 0]
    np.testing.assert_allclose(coef, [-1.0, 0.3, 0.2, 0.1, 0.4], atol=1e-6)


def test_ewma_opt_picks_the_generating_decay():
    rng = np.random.default_rng(1)
    n, L = 3000, 64
    x = rng.normal(size=(n, L))
    y = 0.5 + 2.0 * (x @ ewma_weights(L, 0.9))
    y2 = np.stack([y, y], axis=1)
    m = fit_ewma_opt(x[:2000], y2[:2000], x[2000:], y2[2000:])
    assert m.params["decay"] == 0.9
    assert m.params["level"][0] == pytest.approx(0.5) and m.params["slope"][0] == pytest.approx(2.0)


def test_baselines_by_hand():
    hlc = np.array([[[3.0, 1.0, 2.0], [5.0, 2.0, 4.0], [4.0, 1.0, 2.0]]])  # ranges 2, 3, 3; closes 2, 4, 2
    b = baselines(hlc, 2, lam=0.5)
    assert b["persistence"][0, 0] == 3.0
    assert b["persistence"][0, 1] == pytest.approx(np.sqrt(2) * np.log(2.0))
    assert b["ewma"][0, 0] == pytest.approx((2 * 0.25 + 3 * 0.5 + 3 * 1.0) / 1.75)
    assert b["ewma"][0, 1] == pytest.approx(np.sqrt(2 * np.log(2.0) ** 2))  # both squared returns equal


def test_onnx_graph_equals_the_formula(tmp_path):
    rng = np.random.default_rng(2)
    L = 8
    w, b = rng.normal(0, 0.1, size=(L, 2)), np.array([-0.5, -4.0])
    q = np.array([[-0.5, 0.0, 0.4], [-0.3, 0.01, 0.2]])
    model = LinearLogModel("t", w, b, quantiles=q)
    path = export_onnx(model, L, tmp_path / "m.onnx")
    close = 100 + rng.normal(size=(5, L)).cumsum(axis=1)
    high, low = close + rng.uniform(0, 2, size=(5, L)), close - rng.uniform(0, 2, size=(5, L))
    high[0, -1] = low[0, -1] = close[0, -1]  # a flat candle: the floor applies
    hlc = np.stack([high, low, close], axis=2)
    f, qs = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"features": hlc})
    for i in range(5):
        x = [np.log(max(high[i, k] - low[i, k], FLOOR * close[i, k]) / close[i, k]) for k in range(L)]
        lp = np.array([sum(x[k] * w[k, j] for k in range(L)) + b[j] for j in range(2)])
        want = [np.exp(lp[0]) * close[i, -1], np.exp(lp[1])]
        np.testing.assert_allclose(f[i], want, rtol=1e-12)
        np.testing.assert_allclose(qs[i, 0], np.exp(lp[0] + q[0]) * close[i, -1], rtol=1e-12)
        np.testing.assert_allclose(qs[i, 1], np.exp(lp[1] + q[1]), rtol=1e-12)


@pytest.mark.slow
def test_range_job_on_real_candles(tmp_path):
    from services.trainer.jobs import TrainOptions, run_training

    out = tmp_path / "ds"
    m = build_dataset(BuildSpec(kind="range-vol", inputs=[str(BTC_15M)], out=out, train_fraction=0.6,
                                validation_fraction=0.1))
    assert m["horizons"] == [1, 16] and m["lookback"] == 64
    r = m["ranges"]
    assert r["train"]["end"] < r["validation"]["start"] and r["validation"]["end"] < r["gate"]["start"]
    assert r["gate"]["end"] < r["test"]["start"]
    reg = tmp_path / "reg"
    res = run_training(out, TrainOptions(registry=str(reg)))
    name = res.published.meta.name
    pkg = reg / name / "1"
    meta = verify_package(pkg)
    assert Registry(str(reg)).models() == [name] and meta.kind == "range-vol"
    # test-slice MAEs recomputed from the graph and the candles
    z = np.load(out / m["series"][0]["file"])
    p, a = z["prices"], z["anchors_test"]
    hlc = p[a[:, None] + np.arange(-63, 1)[None, :]][:, :, 1:4]
    f, qs = ort.InferenceSession(str(pkg / MODEL_FILE), providers=["CPUExecutionProvider"]).run(None, {"features": hlc})
    actual_range = p[a + 1, 1] - p[a + 1, 2]
    assert meta.metrics["range@1_mae"] == pytest.approx(np.mean(np.abs(f[:, 0] - actual_range)), rel=1e-9)
    assert meta.baseline_metrics["persistence"]["range@1_mae"] == pytest.approx(
        np.mean(np.abs(p[a, 1] - p[a, 2] - actual_range)), rel=1e-9)
    inside = (actual_range >= qs[:, 0, 0]) & (actual_range <= qs[:, 0, 2])
    assert meta.evaluation["intervals"]["range@1"]["model"]["coverage"] == pytest.approx(inside.mean())
    v = meta.evaluation["verdicts"]
    chosen = meta.config["model"]
    gate = [v["gate"][f"{chosen}:{t}:persistence"] for t in ("range@1", "rvol@16")]
    test = [v["test"][f"{chosen}:{t}:persistence"] for t in ("range@1", "rvol@16")]
    assert meta.promoted == (all(g["beats"] for g in gate) and not any(t["loses"] for t in test))
    card = (pkg / "README.md").read_text()
    assert f"{gate[0]['dm_p_value']:.3g}" in card and "80 % intervals" in card
    assert json.loads((pkg / "klinebus.json").read_text())["config"]["intervals"]["calibrated_on"] == "gate"
    # klinebus evaluate scores only windows after the gate slice: here exactly the test slice
    from services.trainer.scoring import score_package

    out = score_package(pkg, [str(BTC_15M)])
    assert out["samples"] == len(a) and out["skipped_seen"] > 0
    assert out["verdicts"]["range@1:persistence"]["model_mae"] == pytest.approx(meta.metrics["range@1_mae"], rel=1e-12)
    assert out["intervals"]["range@1"]["coverage"] == pytest.approx(inside.mean())
