"""The fast path of issue 23 item 4 (behaviour only, no timings): the trainer packages an int8
variant of a recurrent graph beside the float one, checked on real windows, hashed by the
manifest and named in klinebus.json; serving runs it by default with the stated session options;
its forecasts stay within the stated tolerance of the float graph's on real held-out candles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from libs.common import model_package as mp
from services.inference.model_runner import FAST, FLOAT, OnnxModel, model_file, session_options
from services.inference.package import load_package
from services.trainer import export

pytestmark = pytest.mark.slow  # trains the seed BiLSTM for a few batches (~30 s on 2 cores)

BTC_15M = Path(__file__).resolve().parents[2] / "data" / "klines" / "BTCUSDT-15m-2023-04-01-head3000.csv.gz"


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    from services.trainer.datasets import BuildSpec, build_dataset
    from services.trainer.jobs import TrainOptions, run_training

    root = tmp_path_factory.mktemp("fast-path")
    build_dataset(BuildSpec(kind="bilstm-ohlc", inputs=[str(BTC_15M)], out=root / "ds"))
    published = run_training(root / "ds", TrainOptions(registry=str(root / "reg"), epochs=1, max_batches=8, device="cpu")).published
    return Path(published.uri)


def held_out(folder: Path):
    """Real bilstm-13-v1 windows of the package's test slice (candles training never saw), their
    last close and the next candle's close."""
    import pandas as pd

    from libs.indicators.batch import compute_frame
    from libs.indicators.feature_sets import get_feature_set

    meta = mp.read_package(folder)
    frame = compute_frame(pd.read_csv(BTC_15M), get_feature_set(meta.feature_set).features, interval_ms=900_000).dropna()
    feats = frame[list(meta.features)].to_numpy(np.float64)
    t = frame["open_time"].to_numpy()
    c, L = meta.features.index("close"), meta.lookback
    ends = [e for e in range(L - 1, len(feats) - 1) if t[e - L + 1] >= meta.ranges.test.start]
    windows = np.stack([feats[e - L + 1:e + 1] for e in ends])
    return windows, windows[:, -1, c], feats[[e + 1 for e in ends], c]


def test_the_trainer_packages_a_checked_int8_variant_named_and_hashed(package):
    meta = mp.verify_package(package)
    files, _ = mp.read_manifest(package)
    assert mp.FAST_MODEL_FILE in files
    assert meta.config["fast_model"]["file"] == mp.FAST_MODEL_FILE
    assert meta.config["fast_model"]["sha256"] == files[mp.FAST_MODEL_FILE]["sha256"] == mp.sha256_file(package / mp.FAST_MODEL_FILE)
    check = meta.evaluation["export_check"]
    assert check["fast_kept"] == 1.0 and check["fast_mean_diff_vs_move"] <= export.FAST_MAX_MOVE_DIFF
    assert check["fast_max_rel_diff"] <= export.FAST_MAX_REL_DIFF
    import onnx

    ops = {n.op_type for n in onnx.load(str(package / mp.FAST_MODEL_FILE)).graph.node}
    assert "DynamicQuantizeLSTM" in ops and "LSTM" not in ops


def test_verification_refuses_a_fast_file_klinebus_json_does_not_name(package, tmp_path):
    # The file alone (manifest rewritten to match, so only the naming is wrong): refused.
    unnamed = tmp_path / "unnamed"
    shutil.copytree(package, unnamed)
    doc = json.loads((unnamed / mp.META_FILE).read_text())
    del doc["config"]["fast_model"]
    (unnamed / mp.META_FILE).write_text(json.dumps(doc))
    mp.write_manifest(unnamed)
    with pytest.raises(mp.PackageError, match="config.fast_model"):
        mp.verify_package(unnamed)
    # Another int8 file under the recorded name (manifest rewritten): the recorded hash differs.
    swapped = tmp_path / "swapped"
    shutil.copytree(package, swapped)
    (swapped / mp.FAST_MODEL_FILE).write_bytes((package / mp.MODEL_FILE).read_bytes())
    mp.write_manifest(swapped)
    with pytest.raises(mp.PackageError, match="config.fast_model"):
        mp.verify_package(swapped)


def test_serving_runs_the_fast_variant_by_default_with_the_stated_session_options(package):
    spec = load_package(str(package), None, package.parent)
    fast, float_ = OnnxModel(spec), OnnxModel(spec, variant=FLOAT)
    assert (fast.variant, float_.variant) == (FAST, FLOAT)
    assert model_file(spec)[0].name == mp.FAST_MODEL_FILE and model_file(spec, FLOAT)[0].name == mp.MODEL_FILE
    ops = {n.op_type for n in __import__("onnx").load(str(model_file(spec)[0])).graph.node}
    assert "DynamicQuantizeLSTM" in ops
    for threads in (1, 2):
        opts = OnnxModel(spec, threads).session.get_session_options()
        assert opts.intra_op_num_threads == threads and opts.inter_op_num_threads == 1
        assert opts.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
        assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert session_options(2).get_session_config_entry("session.intra_op.allow_spinning") == "0"
    # A package without a fast variant serves model.onnx, and asking for "fast" there is an error.
    bare = spec.__class__(**{**spec.__dict__, "meta": spec.meta.model_copy(update={"config": {}})})
    assert OnnxModel(bare).variant == FLOAT
    with pytest.raises(mp.PackageError, match="no fast variant"):
        OnnxModel(bare, variant=FAST)


def test_fast_forecasts_stay_within_tolerance_of_the_float_ones_on_held_out_candles(package):
    spec = load_package(str(package), None, package.parent)
    windows, last, actual = held_out(package)
    assert len(windows) >= 100
    fast = OnnxModel(spec).predict(windows, last)
    flt = OnnxModel(spec, variant=FLOAT).predict(windows, last)
    q = np.array([[f.predicted[k] for k in ("open", "high", "low", "close")] for f in fast])
    f = np.array([[f.predicted[k] for k in ("open", "high", "low", "close")] for f in flt])
    move = np.mean(np.abs(f - last[:, None]))
    # The stated tolerance (services/trainer/export.py): mean difference <= 5 % of the float
    # forecast's mean move from the last close, no answer more than 1e-3 of the float price away.
    assert np.mean(np.abs(q - f)) <= export.FAST_MAX_MOVE_DIFF * move
    assert np.max(np.abs(q - f) / f) <= export.FAST_MAX_REL_DIFF
    # The accuracy cost on the next close: the int8 MAE within 1 % of the float MAE.
    mae_q, mae_f = np.mean(np.abs(q[:, 3] - actual)), np.mean(np.abs(f[:, 3] - actual))
    assert abs(mae_q - mae_f) <= 0.01 * mae_f
    # Every forecast still carries its steps and bands (the runner around the session is unchanged).
    assert all(len(a.steps) == len(b.steps) for a, b in zip(fast, flt))


class _Lstm(torch.nn.Module):
    """A tiny price forecaster shaped like the trainer's ServingGraph: a BiLSTM's last state
    decoded as a small log return from the window's last close (column ``close_index``)."""

    close_index = 0

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lstm = torch.nn.LSTM(3, 8, batch_first=True, bidirectional=True)

    def forward(self, x):
        z = ((x - 100.0) / 5.0).to(torch.float32)
        h = self.lstm(z)[0][:, -1, :].to(torch.float64)
        return x[:, -1, 0:1] * torch.exp(0.01 * h)


def test_the_check_drops_a_variant_past_the_bound(tmp_path, monkeypatch):
    x = 100.0 + 5.0 * np.random.default_rng(0).normal(size=(16, 5, 3))
    module = _Lstm().eval()
    path = export.export_onnx(module, (torch.from_numpy(x[:2]),), tmp_path / "model.onnx", ["x"], ["y"])
    fast = tmp_path / export.FAST_MODEL_FILE
    assert fast.exists()  # a recurrent graph gets its int8 variant
    report = export.check_onnx(module, path, {"x": x})
    assert report["fast_kept"] == 1.0 and fast.exists()
    monkeypatch.setattr(export, "FAST_MAX_MOVE_DIFF", 0.0)
    export.export_onnx(module, (torch.from_numpy(x[:2]),), path, ["x"], ["y"])
    report = export.check_onnx(module, path, {"x": x})
    assert report["fast_kept"] == 0.0 and not fast.exists()  # the package then ships the float graph alone
    export.export_onnx(module, (torch.from_numpy(x[:2]),), path, ["x"], ["y"], fast=False)
    assert not fast.exists() and "fast_int8" not in export.check_onnx(module, path, {"x": x})
