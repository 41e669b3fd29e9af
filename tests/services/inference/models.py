"""Real model packages and real features events for the inference tests.

Packages are real ONNX graphs (weights inside) written with ``libs.common.model_package`` and
published into a real local registry; their expected outputs are computed here with numpy from
the same weights, independently of the service's code. Features come from real candles
(tests/data/klines) through the shared indicator library, as the features service makes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from libs.common import model_package as mp
from libs.common import topics
from libs.common.contracts import FeaturesEvent, ModelPublished
from libs.common.klines import interval_ms
from libs.common.signing import Keyring
from libs.indicators.batch import compute_frame
from libs.indicators.feature_sets import get_feature_set
from tests.candles import BTC_15M, load

# The control-topic keyring the inference tests run with (KLINEBUS_CONTROL_KEYS); a test key only.
CONTROL_KEYS = "tests-1:" + "0123456789abcdef" * 4
KEYRING = Keyring.parse(CONTROL_KEYS)
FEATURE_SET = "skeleton-v1"  # close, sma_20, ema_20, rsi_14: warm from the 20th candle


def linear_onnx(path: Path, lookback: int, n_features: int, n_out: int, seed: int, in_name: str = "window",
                out_name: str = "prices", bias: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``prices[b] = flatten(window[b]) @ W + c``: a real graph, float32, dynamic batch. Returns (W, c)."""
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    # Weights that average the window's closes (column 0) plus a small seeded tilt: outputs stay
    # near the price, and two versions (two seeds) give visibly different forecasts.
    w = np.zeros((lookback * n_features, n_out), dtype=np.float32)
    w[0::n_features, :] = 1.0 / lookback
    w += rng.normal(0, 1e-4, size=w.shape).astype(np.float32)
    c = (rng.normal(0, 1.0, size=n_out) + bias).astype(np.float32)
    nodes = [
        helper.make_node("Flatten", [in_name], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["mm"]),
        helper.make_node("Add", ["mm", "c"], [out_name]),
    ]
    graph = helper.make_graph(
        nodes, "linear",
        [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, ["batch", lookback, n_features])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["batch", n_out])],
        initializer=[
            helper.make_tensor("W", TensorProto.FLOAT, list(w.shape), w.flatten().tolist()),
            helper.make_tensor("c", TensorProto.FLOAT, [n_out], c.tolist()),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return w, c


def meta(name: str, *, features: Sequence[str], lookback: int, targets: Sequence[str] = ("close",),
         horizons: Sequence[int] = (1,), serves: Sequence[tuple[str, str]] = (("BTCUSDT", "15m"),),
         feature_set: str = FEATURE_SET, kind: str = "lstm-close", n_out: int | None = None,
         promoted: bool = True, **over) -> mp.ModelPackage:
    n_out = n_out or len(targets) * len(horizons)
    fields = dict(
        name=name, version="1", kind=kind,
        inputs=[mp.TensorSpec(name="window", dtype="float32", shape=["batch", lookback, len(features)])],
        outputs=[mp.TensorSpec(name="prices", dtype="float32", shape=["batch", n_out], meaning="prices")],
        feature_set=feature_set, features=list(features), targets=list(targets), lookback=lookback,
        horizons=list(horizons), serves=[mp.Served(symbol=s, interval=i) for s, i in serves],
        ranges=mp.Ranges(train=mp.TimeRange(start=0, end=10, rows=11), validation=mp.TimeRange(start=20, end=30, rows=11),
                         test=mp.TimeRange(start=40, end=50, rows=11), embargo=2),
        metrics={"mae": 1.0}, baseline_metrics={"persistence": {"mae": 2.0}}, promoted=promoted,
        sha256="", code_version="tests",
    )
    fields.update(over)
    return mp.ModelPackage(**fields)


class Built:
    """A published package and the numpy twin of its graph."""

    def __init__(self, published: mp.PublishedPackage, w: np.ndarray, c: np.ndarray, spec: mp.ModelPackage) -> None:
        self.published, self.w, self.c, self.meta = published, w, c, spec

    @property
    def folder(self) -> Path:
        return Path(self.published.uri)

    def expected(self, window: np.ndarray) -> np.ndarray:
        """What the graph answers for one raw window, in float32 as onnxruntime computes it."""
        x = window.astype(np.float32).reshape(1, -1)
        return (x @ self.w + self.c)[0].astype(np.float64)

    def announcement(self, *, signed: bool = True, **over) -> ModelPublished:
        """The models.v1 event the trainer would publish: signed with the tests' key unless ``signed`` is False."""
        m = self.meta
        fields = dict(model=m.name, version=self.published.version, uri=self.published.uri,
                      sha256=self.published.sha256, feature_set=m.feature_set, train_range=(0, 10),
                      eval_range=(40, 50), metrics=m.metrics, baseline_metrics=m.baseline_metrics, promoted=m.promoted)
        fields.update(over)
        event = ModelPublished(**fields)
        return KEYRING.sign(topics.MODELS, event) if signed else event


def publish(registry: Path, tmp: Path, name: str, *, seed: int = 1, features: Sequence[str] = ("close", "sma_20"),
            lookback: int = 3, bias: float = 0.0, **kw) -> Built:
    """Write a linear package and publish it into ``registry`` as the model's next version."""
    m = meta(name, features=features, lookback=lookback, **kw)
    n_out = m.outputs[0].shape[1]
    staged_root = tmp / f"staged-{name}-{seed}"
    staged_root.mkdir(parents=True, exist_ok=True)
    onnx_path = staged_root / "model.onnx"
    w, c = linear_onnx(onnx_path, lookback, len(features), int(n_out), seed, bias=bias)
    written = mp.write_package(staged_root / "pkg", m, onnx_path, card=f"---\nlicense: mit\n---\n# {name}\n")
    published = mp.Registry(str(registry)).publish(staged_root / "pkg")
    return Built(published, w, c, written)


def feature_events(n: int, symbol: str = "BTCUSDT", interval: str = "15m", feature_set: str = FEATURE_SET,
                   start: int = 0) -> list[FeaturesEvent]:
    """``n`` consecutive features events of real BTCUSDT 15m candles, as the features service
    publishes them: ``values`` empty until every feature of the set is warm."""
    c = load(BTC_15M)
    fs = get_feature_set(feature_set)
    import pandas as pd

    frame = pd.DataFrame({"open_time": c.open_time, "open": c.open, "high": c.high, "low": c.low,
                          "close": c.close, "volume": c.volume})
    feats = compute_frame(frame, fs.features, interval_ms=interval_ms(interval))
    out = []
    for i in range(start, start + n):
        row = {name: float(feats[name].iloc[i]) for name in fs.features}
        warm = all(v == v for v in row.values())
        out.append(FeaturesEvent(symbol=symbol, interval=interval, open_time=int(c.open_time[i]), close=float(c.close[i]),
                                 feature_set=fs.id, values=row if warm else {}, warm=warm))
    return out


def window_of(events: Sequence[FeaturesEvent], i: int, features: Sequence[str], lookback: int) -> np.ndarray:
    """The raw window a model sees at event ``i`` (built here from the events, not by the service)."""
    return np.asarray([[events[j].values[f] for f in features] for j in range(i - lookback + 1, i + 1)])
