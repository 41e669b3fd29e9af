"""One model package in onnxruntime: windows in, forecasts out, preprocessing from the package only.

``OnnxModel.predict`` takes ``[batch, lookback, n_features]`` raw feature windows (columns in
the package's order), applies the package's scaler, runs the session once for the whole
batch and turns each output row into a ``Forecast`` (prices in the market's units). The
session is checked against the manifest when it loads and warmed with one batch, so a model
that loads is a model that answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from services.inference.package import LOG_RETURN, PROBS, ModelSpec, Output, PackageError

DTYPES = {"float32": np.float32, "float64": np.float64}
ORT_TYPES = {"tensor(float)": "float32", "tensor(double)": "float64"}


class ModelOutputError(ValueError):
    """A session answered with something its manifest did not promise (shape, NaN)."""


@dataclass
class Forecast:
    """What one model says about one window: prices for ``horizons`` steps ahead and/or classes."""

    predicted: dict[str, float] = field(default_factory=dict)  # next candle: open/high/low/close
    path: list[float] | None = None  # close at each horizon
    probabilities: dict[str, float] | None = None

    @property
    def close(self) -> float | None:
        if "close" in self.predicted:
            return self.predicted["close"]
        return self.path[0] if self.path else None


def _session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # Several services share a node; one intra-op thread per model keeps them from fighting over
    # cores, and each model runs in its own worker thread, so models still run side by side.
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OnnxModel:
    def __init__(self, spec: ModelSpec, threads: int = 1) -> None:
        if spec.path is None:
            raise PackageError(f"{spec.label}: no model file")
        self.spec = spec
        self.dtype = DTYPES[spec.input_dtype]
        try:
            self.session = _session(spec.path, threads)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise PackageError(f"{spec.label}: onnxruntime cannot load {spec.path.name}: {_line(exc)}") from None
        self._check_signature()
        if spec.scaler is not None:
            self._offset = np.asarray(spec.scaler.center, dtype=np.float64)
            self._scale = np.asarray(spec.scaler.scale, dtype=np.float64)
        self._output_names = [o.name for o in spec.outputs]

    def _check_signature(self) -> None:
        spec = self.spec
        inputs = self.session.get_inputs()
        if [i.name for i in inputs] != [spec.input_name]:
            raise PackageError(f"{spec.label}: model inputs {[i.name for i in inputs]} != manifest's [{spec.input_name!r}]")
        (inp,) = inputs
        if len(inp.shape) != spec.input_rank:
            raise PackageError(f"{spec.label}: input {inp.name} has rank {len(inp.shape)}, manifest says {spec.input_rank}")
        if ORT_TYPES.get(inp.type) != spec.input_dtype:
            raise PackageError(f"{spec.label}: input {inp.name} is {inp.type}, manifest says {spec.input_dtype}")
        if isinstance(inp.shape[0], int) and inp.shape[0] != 1:
            raise PackageError(f"{spec.label}: input batch dimension is fixed at {inp.shape[0]}; packages need a dynamic batch")
        have = {o.name for o in self.session.get_outputs()}
        missing = [o.name for o in spec.outputs if o.name not in have]
        if missing:
            raise PackageError(f"{spec.label}: the model has no output(s) {missing} (it has {sorted(have)})")

    def warm(self) -> None:
        """Run one batch of two windows (the first session call pays one-off allocation costs, and
        a graph that cannot run its own declared shapes fails here, before it serves)."""
        x = np.ones((2, self.spec.lookback, len(self.spec.features)), dtype=np.float64)
        try:
            self.predict(x, np.ones(2))
        except ModelOutputError as exc:
            raise PackageError(f"{self.spec.label}: warm-up: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own errors
            raise PackageError(f"{self.spec.label}: warm-up run failed: {_line(exc)}") from None

    def prepare(self, windows: np.ndarray) -> np.ndarray:
        """Raw ``[batch, lookback, features]`` windows -> the session's input tensor."""
        spec = self.spec
        if windows.ndim != 3 or windows.shape[1:] != (spec.lookback, len(spec.features)):
            raise ModelOutputError(
                f"{spec.label} needs [batch, {spec.lookback}, {len(spec.features)}] windows, got {list(windows.shape)}"
            )
        x = windows
        if spec.scaler is not None:
            x = (x - self._offset) / self._scale
        if spec.input_rank == 2:
            x = x[:, :, 0]
        return np.ascontiguousarray(x, dtype=self.dtype)

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self._output_names, {self.spec.input_name: x})

    def predict(self, windows: np.ndarray, last_close: np.ndarray) -> list[Forecast]:
        """One session call for the whole batch; one ``Forecast`` per window."""
        raw = self.run(self.prepare(windows))
        n = len(windows)
        last_close = np.asarray(last_close, dtype=np.float64)
        out = [Forecast() for _ in range(n)]
        first_h = self.spec.horizons[0]
        for spec_out, values in zip(self.spec.outputs, raw):
            cols = self._columns(spec_out, np.asarray(values), n)
            if spec_out.kind == PROBS:
                for f, row in zip(out, cols):
                    f.probabilities = {c: float(p) for c, p in zip(spec_out.columns, row)}
                continue
            prices = _to_prices(spec_out, cols, last_close)
            closes = [i for i, (t, _) in enumerate(spec_out.columns) if t == "close"]
            nexts = [(i, t) for i, (t, h) in enumerate(spec_out.columns) if h == first_h]
            for f, row in zip(out, prices):
                f.predicted.update({t: float(row[i]) for i, t in nexts})
                if len(closes) > 1:
                    f.path = [float(row[i]) for i in closes]
        return out

    def _columns(self, spec_out: Output, values: np.ndarray, n: int) -> np.ndarray:
        width = len(spec_out.columns)
        if values.shape[:1] != (n,) or values.size != n * width:
            raise ModelOutputError(
                f"{self.spec.label}: output {spec_out.name} has shape {list(values.shape)}, expected [{n}, {width}]"
            )
        cols = values.reshape(n, width).astype(np.float64)
        if not np.isfinite(cols).all():
            raise ModelOutputError(f"{self.spec.label}: output {spec_out.name} holds NaN or infinity")
        return cols


def _to_prices(spec_out: Output, cols: np.ndarray, last_close: np.ndarray) -> np.ndarray:
    if spec_out.scaler is not None:
        cols = cols * np.asarray(spec_out.scaler.scale) + np.asarray(spec_out.scaler.center)
    if spec_out.decode == LOG_RETURN:
        return last_close[:, None] * np.exp(cols)
    return cols


def _line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]
