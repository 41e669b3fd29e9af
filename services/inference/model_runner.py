"""One model package in onnxruntime: windows in, forecasts out, preprocessing from the package only.

``OnnxModel.predict`` takes ``[batch, lookback, n_features]`` raw feature windows (columns in
the package's order), applies the package's scaler, runs the session once for the whole
batch and turns each output row into a ``Forecast`` (prices in the market's units). The
session is checked against the manifest when it loads and warmed with one batch, so a model
that loads is a model that answers.

Fast path: a package whose trainer left an int8 serving variant (``model.int8.onnx``, named with
its sha256 in ``config.fast_model``, verified with the package, checked by the trainer against the
float graph on real windows) is served from that file unless ``variant="float"`` is asked for;
``OnnxModel.variant`` says which file runs. The seed BiLSTM answers a 1,000-window burst ~1.8x
faster with it (bench/bench_inference.py, docs/inference.md "Fast path").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from libs.common.model_package import FAST_MODEL_FILE
from services.inference.package import LEVELS, LOG_RETURN, PROBS, Intervals, ModelSpec, Output, PackageError

DTYPES = {"float32": np.float32, "float64": np.float64}
ORT_TYPES = {"tensor(float)": "float32", "tensor(double)": "float64"}


class ModelOutputError(ValueError):
    """A session answered with something its manifest did not promise (shape, NaN)."""


RANGE_FLOOR = 1e-5  # the trainer's floor on a candle's relative range (services/trainer/range_model.FLOOR)


@dataclass(frozen=True)
class Step:
    """One forecast column to score when its target closes: the forecast, persistence's, and
    both 80 % intervals (None where the package has none)."""

    target: str  # "close", "range", "rvol<N>"
    horizon: int
    predicted: float
    baseline: float
    lower: float | None = None
    upper: float | None = None
    baseline_lower: float | None = None
    baseline_upper: float | None = None


@dataclass
class Forecast:
    """What one model says about one window: prices for ``horizons`` steps ahead and/or classes,
    or a range/volatility model's levels; with the package's intervals when it has them."""

    predicted: dict[str, float] = field(default_factory=dict)  # next candle: open/high/low/close, or range/rvolN
    path: list[float] | None = None  # close at each horizon
    probabilities: dict[str, float] | None = None
    target: str = "price"  # what ``predicted`` holds: price, range, class
    quantiles: dict[str, dict[str, float]] | None = None  # "close@1" -> {"0.1": .., "0.5": .., "0.9": ..}
    steps: list[Step] = field(default_factory=list)  # what live scoring judges

    @property
    def close(self) -> float | None:
        if "close" in self.predicted:
            return self.predicted["close"]
        return self.path[0] if self.path else None


FAST, FLOAT, AUTO = "fast", "float", "auto"


def session_options(threads: int):
    """The serving session's options: ``threads`` intra-op threads, one inter-op thread, sequential
    execution, every graph optimisation; with more than one thread the pool's workers sleep
    instead of spinning between calls, so an idle model leaves its cores to the event loop and Redis."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # Several services share a node; one intra-op thread per model keeps them from fighting over
    # cores, and each model runs in its own worker thread, so models still run side by side.
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads > 1:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def _session(path: Path, threads: int):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])


def model_file(spec: ModelSpec, variant: str = AUTO) -> tuple[Path, str]:
    """``(file, variant)`` to serve: the package's fast variant when it names one (``auto``, ``fast``),
    else ``model.onnx``; ``fast`` on a package without one is a ``PackageError``."""
    if variant not in (AUTO, FAST, FLOAT):
        raise ValueError(f"variant must be {AUTO!r}, {FAST!r} or {FLOAT!r}, got {variant!r}")
    fast = (spec.meta.config.get("fast_model") if spec.meta is not None else None) or None
    if variant != FLOAT and isinstance(fast, dict) and fast.get("file") == FAST_MODEL_FILE:
        return spec.path.with_name(FAST_MODEL_FILE), FAST
    if variant == FAST:
        raise PackageError(f"{spec.label}: the package has no fast variant ({FAST_MODEL_FILE})")
    return spec.path, FLOAT


class OnnxModel:
    def __init__(self, spec: ModelSpec, threads: int = 1, variant: str = AUTO) -> None:
        if spec.path is None:
            raise PackageError(f"{spec.label}: no model file")
        self.spec = spec
        self.dtype = DTYPES[spec.input_dtype]
        path, self.variant = model_file(spec, variant)
        try:
            self.session = _session(path, threads)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise PackageError(f"{spec.label}: onnxruntime cannot load {path.name}: {_line(exc)}") from None
        self._check_signature()
        if spec.scaler is not None:
            self._offset = np.asarray(spec.scaler.center, dtype=np.float64)
            self._scale = np.asarray(spec.scaler.scale, dtype=np.float64)
        self._output_names = [o.name for o in spec.outputs]
        iv = spec.intervals
        if iv is not None:
            self._iv_index = {c: i for i, c in enumerate(iv.columns)}
            self._q = np.asarray(iv.quantiles, dtype=np.float64)
            self._qb = np.asarray(iv.baseline, dtype=np.float64) if iv.baseline is not None else None
            self._lo, self._hi = iv.levels.index(min(iv.levels)), iv.levels.index(max(iv.levels))
        f = spec.features
        self._hlc = tuple(f.index(c) for c in ("high", "low", "close")) if {"high", "low", "close"} <= set(f) else None

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
            if spec_out.kind == LEVELS:
                self._levels(spec_out, cols, windows, out)
                continue
            prices = _to_prices(spec_out, cols, last_close)
            closes = [i for i, (t, _) in enumerate(spec_out.columns) if t == "close"]
            nexts = [(i, t) for i, (t, h) in enumerate(spec_out.columns) if h == first_h]
            for f, row in zip(out, prices):
                f.predicted.update({t: float(row[i]) for i, t in nexts})
                if len(closes) > 1:
                    f.path = [float(row[i]) for i in closes]
            names = [f"{t}@{h}" for t, h in spec_out.columns]
            bands = self._bands(names, prices, windows)
            for k, (f, row, lc) in enumerate(zip(out, prices, last_close)):
                if bands is not None:
                    f.quantiles = {**(f.quantiles or {}), **bands[0][k]}
                for i in closes:
                    _, h = spec_out.columns[i]
                    lo = hi = blo = bhi = None
                    if bands is not None and names[i] in bands[1]:
                        lo, hi = bands[1][names[i]][k]
                        if bands[2] is not None:
                            blo, bhi = lc * bands[2][names[i]][0], lc * bands[2][names[i]][1]
                    f.steps.append(Step("close", h, float(row[i]), float(lc), lo, hi, blo, bhi))
        return out

    def _scale(self, windows: np.ndarray) -> np.ndarray:
        """Per window, the trainer's band scale (``services/trainer/jobs.vol_scale``): the geometric
        mean relative range of the last ``scale_candles`` rows; ones for a fixed band."""
        n = self.spec.intervals.scale_candles if self.spec.intervals is not None else 0
        if not n or self._hlc is None:
            return np.ones(len(windows))
        h, lo, c = self._hlc
        w = windows[:, -n:, :]
        return np.exp(np.mean(np.log(np.maximum(w[..., h] - w[..., lo], RANGE_FLOOR * w[..., c]) / w[..., c]), axis=1))

    def _bands(self, names: list[str], values: np.ndarray, windows: np.ndarray):
        """``(quantiles per window, {column: [(lower, upper)] per window}, {column: (q_lo, q_hi)} of
        persistence or None)`` for the columns the package has intervals for; None without intervals."""
        iv: Intervals | None = self.spec.intervals
        if iv is None:
            return None
        scale = self._scale(windows)
        keys = [f"{q:g}" for q in iv.levels]
        per_window: list[dict[str, dict[str, float]]] = [{} for _ in range(len(values))]
        inner: dict[str, list[tuple[float, float]]] = {}
        base = {} if self._qb is not None else None
        for i, name in enumerate(names):
            j = self._iv_index.get(name)
            if j is None:
                continue
            band = values[:, i, None] * np.exp(self._q[j][None, :] * scale[:, None])  # [n, levels]
            for k in range(len(values)):
                per_window[k][name] = {key: float(v) for key, v in zip(keys, band[k])}
            inner[name] = [(float(b[self._lo]), float(b[self._hi])) for b in band]
            if base is not None:
                base[name] = (float(np.exp(self._qb[j][self._lo])), float(np.exp(self._qb[j][self._hi])))
        return per_window, inner, base

    def _levels(self, spec_out: Output, cols: np.ndarray, windows: np.ndarray, out: list[Forecast]) -> None:
        """A range/volatility model (``range-vol``): ``range`` = next candle's high - low, ``rvolN`` =
        realised volatility of the next N candles. Persistence (the trainer's baseline): the last
        candle's range; the realised vol of the window's last N log returns."""
        names = [f"{t}@{h}" for t, h in spec_out.columns]
        bands = self._bands(names, cols, windows)
        h, lo, c = self._hlc if self._hlc is not None else (None, None, None)
        for k, f in enumerate(out):
            f.target = "range"
            for i, (t, hz) in enumerate(spec_out.columns):
                label = "range" if t == "range" else f"{t}{hz}"
                f.predicted[label] = float(cols[k, i])
                if h is None:
                    continue
                win = windows[k]
                if t == "range":
                    base = float(win[-1, h] - win[-1, lo])
                else:
                    base = persistence_rvol(win[-(hz + 1):, c])
                lo_, hi_ = bands[1][names[i]][k] if bands is not None and names[i] in bands[1] else (None, None)
                blo = bhi = None
                if bands is not None and bands[2] is not None and names[i] in bands[2]:
                    blo, bhi = base * bands[2][names[i]][0], base * bands[2][names[i]][1]
                f.steps.append(Step(label, hz, float(cols[k, i]), base, lo_, hi_, blo, bhi))
            if bands is not None:
                f.quantiles = bands[0][k]

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


def persistence_rvol(closes: np.ndarray) -> float:
    """Persistence's realised volatility forecast: that of the log returns between ``closes`` (the
    last N + 1 closes up to the forecast candle). One function for serving and for a forecast
    restored after a restart, so both give the same double."""
    r = np.diff(np.log(np.asarray(closes, dtype=np.float64)))
    return float(np.sqrt(np.sum(r**2)))


def _to_prices(spec_out: Output, cols: np.ndarray, last_close: np.ndarray) -> np.ndarray:
    if spec_out.scaler is not None:
        cols = cols * np.asarray(spec_out.scaler.scale) + np.asarray(spec_out.scaler.center)
    if spec_out.decode == LOG_RETURN:
        return last_close[:, None] * np.exp(cols)
    return cols


def _line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]
