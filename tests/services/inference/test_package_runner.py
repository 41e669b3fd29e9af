"""Packages are verified before they load; onnxruntime answers with the package's preprocessing only."""

from __future__ import annotations

import numpy as np
import pytest

from libs.common import model_package as mp
from services.inference.baseline import ensure_persistence_model, persistence_spec
from services.inference.model_runner import ModelOutputError, OnnxModel
from services.inference.package import PackageError, load_package, registry_packages, spec_from_package
from tests.services.inference.models import feature_events, linear_onnx, meta, publish, window_of


def test_a_published_package_loads_and_answers_what_its_weights_say(tmp_path):
    built = publish(tmp_path / "reg", tmp_path, "lin-BTCUSDT-15m", lookback=3)
    spec = load_package(built.published.uri, built.published.sha256, tmp_path / "cache")
    assert (spec.name, spec.version, spec.lookback, spec.features) == ("lin-BTCUSDT-15m", "1", 3, ("close", "sma_20"))
    assert spec.serves("BTCUSDT", "15m") and not spec.serves("ETHUSDT", "15m")
    model = OnnxModel(spec)
    model.warm()
    events = feature_events(40)
    windows = np.stack([window_of(events, i, spec.features, 3) for i in (30, 35, 39)])
    got = model.predict(windows, windows[:, -1, 0])
    for win, f in zip(windows, got):
        assert f.predicted["close"] == pytest.approx(built.expected(win)[0], rel=1e-6)
        assert f.path is None and f.probabilities is None


def test_multi_step_and_ohlc_outputs_map_to_their_columns(tmp_path):
    path = publish(tmp_path / "reg", tmp_path, "path7", targets=("close",), horizons=tuple(range(1, 8)), lookback=2)
    ohlc = publish(tmp_path / "reg", tmp_path, "ohlc", targets=("open", "close", "high", "low"), lookback=2)
    events = feature_events(30)
    win = window_of(events, 29, ("close", "sma_20"), 2)[None]
    p = OnnxModel(load_package(path.published.uri, path.published.sha256, tmp_path)).predict(win, win[:, -1, 0])[0]
    assert p.path == pytest.approx(path.expected(win[0]).tolist(), rel=1e-6)
    assert p.predicted == {"close": pytest.approx(p.path[0])}
    o = OnnxModel(load_package(ohlc.published.uri, ohlc.published.sha256, tmp_path)).predict(win, win[:, -1, 0])[0]
    want = ohlc.expected(win[0])  # heads in the package's order: open, close, high, low
    assert o.predicted == pytest.approx({"open": want[0], "close": want[1], "high": want[2], "low": want[3]}, rel=1e-6)


def test_caller_scaling_and_log_return_decoding_come_from_the_package(tmp_path):
    features = ("close", "sma_20")
    scalers = {
        "inputs": mp.Scaler(kind="minmax", columns=["sma_20", "close"], center=[20000.0, 21000.0], scale=[9000.0, 8000.0]),
        "targets": mp.Scaler(kind="standard", columns=["close@1"], center=[0.001], scale=[0.01]),
    }
    built = publish(tmp_path / "reg", tmp_path, "scaled", features=features, lookback=2, input_scaling="caller",
                    scalers=scalers)
    spec = load_package(built.published.uri, built.published.sha256, tmp_path)
    events = feature_events(30)
    raw = window_of(events, 29, features, 2)
    got = OnnxModel(spec).predict(raw[None], np.asarray([raw[-1, 0]]))[0]
    # The package's scaler lists sma_20 first: each column is scaled with its own parameters.
    scaled = (raw - np.array([21000.0, 20000.0])) / np.array([8000.0, 9000.0])
    y = built.expected(scaled)[0] * 0.01 + 0.001
    assert got.predicted["close"] == pytest.approx(raw[-1, 0] * np.exp(y), rel=1e-6)


def test_a_package_is_refused_when_its_bytes_differ_from_what_was_announced(tmp_path):
    built = publish(tmp_path / "reg", tmp_path, "lin", lookback=2)
    with pytest.raises(PackageError, match="differs from the announced"):
        load_package(built.published.uri, "0" * 64, tmp_path)
    (built.folder / "model.onnx").write_bytes(b"not a model at all")
    with pytest.raises(PackageError, match="sha256"):
        load_package(built.published.uri, built.published.sha256, tmp_path)


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(feature_set="nope-v1"), "unknown feature set"),
        (dict(features=["close", "vwap_9000"]), "not columns of"),
        (dict(inputs=[mp.TensorSpec(name="image", dtype="int64", shape=["batch", 3]),
                      mp.TensorSpec(name="ids", dtype="int64", shape=["batch", 3])]), "one window tensor"),
        (dict(targets=["direction"]), "not prices"),
        (dict(outputs=[mp.TensorSpec(name="prices", dtype="float32", shape=["batch", 3])]), "cannot hold 1 columns"),
    ],
)
def test_packages_that_cannot_be_served_from_features_say_why(over, match):
    m = meta("bad", **{"features": ("close", "sma_20"), "lookback": 2, **over})
    with pytest.raises(PackageError, match=match):
        spec_from_package(m)


def test_a_graph_that_does_not_match_its_manifest_is_refused_at_load(tmp_path):
    # The manifest promises four heads (OHLC); the graph answers one column.
    bad = meta("shape", features=("close", "sma_20"), lookback=2, targets=("open", "close", "high", "low"))
    linear_onnx(tmp_path / "g.onnx", 2, 2, 1, seed=1)
    written = mp.write_package(tmp_path / "pkg", bad, tmp_path / "g.onnx", card="card")
    model = OnnxModel(spec_from_package(written, tmp_path / "pkg"))
    with pytest.raises(PackageError, match=r"warm-up: .*shape \[2, 1\], expected \[2, 4\]"):
        model.warm()


def test_nan_out_of_a_model_is_an_error_not_a_forecast(tmp_path):
    built = publish(tmp_path / "reg", tmp_path, "lin", lookback=2)
    model = OnnxModel(load_package(built.published.uri, built.published.sha256, tmp_path))
    with pytest.raises(ModelOutputError, match="NaN"):
        model.predict(np.full((1, 2, 2), np.nan), np.ones(1))
    with pytest.raises(ModelOutputError, match=r"needs \[batch, 2, 2\]"):
        model.predict(np.ones((1, 3, 2)), np.ones(1))


def test_registry_scan_serves_the_newest_promoted_version(tmp_path):
    reg = tmp_path / "reg"
    publish(reg, tmp_path, "m", seed=1)
    publish(reg, tmp_path, "m", seed=2)
    publish(reg, tmp_path, "m", seed=3, promoted=False)
    ensure_persistence_model(reg)  # the baseline's folder has no manifest: not a registry model
    (spec,) = registry_packages(reg)
    assert (spec.name, spec.version) == ("m", "2")


def test_persistence_forecasts_the_last_close(tmp_path):
    model = OnnxModel(persistence_spec(ensure_persistence_model(tmp_path)))
    model.warm()
    got = model.predict(np.array([[[1.0]], [[69999.99]]]), np.array([1.0, 69999.99]))
    assert [f.predicted for f in got] == [{"close": 1.0}, {"close": 69999.99}]
