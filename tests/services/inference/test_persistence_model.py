"""The persistence baseline, run as a real ONNX model by onnxruntime."""

import numpy as np
import onnx
import pytest

from services.inference.baseline import INPUT_NAME, OUTPUT_NAME, PERSISTENCE, WINDOW, ensure_persistence_model
from services.inference.model_runner import LoadedModel, OnnxRunner
from services.inference.predictor import Predictor


@pytest.fixture
def runner(tmp_path):
    path = ensure_persistence_model(tmp_path)
    return OnnxRunner(LoadedModel(PERSISTENCE, "1", path, WINDOW, INPUT_NAME, OUTPUT_NAME))


def test_model_file_is_valid_onnx_written_once(tmp_path):
    path = ensure_persistence_model(tmp_path)
    onnx.checker.check_model(onnx.load(path))
    mtime = path.stat().st_mtime_ns
    assert ensure_persistence_model(tmp_path) == path and path.stat().st_mtime_ns == mtime


def test_forecast_is_the_last_close_of_each_window(runner):
    windows = np.array([[1.0, 2.0, 3.5], [70123.45, 70100.0, 69999.99]])
    assert runner.predict(windows).tolist() == [3.5, 69999.99]


def test_wrong_input_shape_is_a_clear_error(runner):
    with pytest.raises(ValueError, match=r"needs \[batch, 1\] inputs"):
        runner.predict(np.array([1.0, 2.0]))


def test_predictor_is_idempotent_per_candle(runner):
    p = Predictor(runner)
    assert p.accept("BTCUSDT", "1m", 60_000, 100.0)
    assert not p.accept("BTCUSDT", "1m", 60_000, 100.0)  # re-delivery
    assert not p.accept("BTCUSDT", "1m", 0, 90.0)  # older than one seen
    assert p.accept("ETHUSDT", "1m", 0, 2000.0)  # other streams are independent
    f = p.forecast("BTCUSDT", "1m", 60_000)
    assert (f.predicted_close, f.last_close, f.target_open_time) == (100.0, 100.0, 120_000)
    assert p.forecast("SOLUSDT", "1m", 0) is None  # nothing seen yet
