"""Range and volatility forecasters: linear models of log relative candle ranges, in numpy, exported
as a tiny ONNX graph built with onnx.helper.

Targets, for a sample anchored at closed candle ``t``:

* ``range``: the next candle's range ``high[t+1] - low[t+1]`` (price units);
* ``rvol``: realised volatility of the next ``N`` candles, ``sqrt(sum_{k=1..N} log(c[t+k]/c[t+k-1])^2)``.

Inputs: the last ``lookback`` candles' high, low, close; the models read ``x = log(max(high - low,
FLOOR * close) / close)`` (the log *relative* range, unit-free, so one model serves any price level).
Every model here predicts ``log(target)`` (``log(range / close[t])`` for the range) as
``x_window @ w + b``, and forecasts ``exp`` of that: the median under symmetric log errors, the
forecast an absolute-error loss rewards.

* ``har``: HAR (Corsi 2009) on log ranges: least squares on the means of the last 1, 4, 16 and 64
  log ranges (fitted on train, nothing tuned).
* ``ewma-opt``: one exponentially weighted mean of the log ranges, its decay picked on the
  validation slice from a grid, its level and slope fitted by least squares on train.

Baselines: ``persistence`` (range: the last range; rvol: the realised vol of the last N candles)
and ``ewma`` (RiskMetrics decay 0.94 over the window: on ranges for the range, on squared returns
for the volatility, scaled to N candles).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FLOOR = 1e-5  # smallest relative range taken (a candle with high == low)
HAR_LAGS = (1, 4, 16, 64)
EWMA_GRID = (0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99)
RISKMETRICS = 0.94
# input columns of the exported graph, in order
COLUMNS = ("high", "low", "close")


def log_rel_range(high: np.ndarray, low: np.ndarray, close: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(high - low, FLOOR * close) / close)


def windows(values: np.ndarray, anchors: np.ndarray, lookback: int) -> np.ndarray:
    """``values[a - lookback + 1 .. a]`` for each anchor, oldest first: ``[n, lookback, ...]``."""
    return values[anchors[:, None] + np.arange(-lookback + 1, 1)[None, :]]


def realised_vol(close: np.ndarray, anchors: np.ndarray, n: int, ahead: bool = True) -> np.ndarray:
    """Over the next ``n`` candles (``ahead``) or the last ``n`` up to the anchor."""
    r = np.diff(np.log(close), prepend=np.nan)  # r[i] = log(c[i] / c[i-1])
    k = np.arange(1, n + 1) if ahead else np.arange(-n + 1, 1)
    return np.sqrt(np.sum(r[anchors[:, None] + k[None, :]] ** 2, axis=1))


def targets(prices: np.ndarray, anchors: np.ndarray, n_vol: int) -> np.ndarray:
    """``[n, 2]``: next range, realised vol over the next ``n_vol`` candles. ``prices``: o, h, l, c."""
    rng = prices[anchors + 1, 1] - prices[anchors + 1, 2]
    return np.stack([rng, realised_vol(prices[:, 3], anchors, n_vol)], axis=1)


def log_targets(y: np.ndarray, last_close: np.ndarray) -> np.ndarray:
    """What the models regress on: ``log(range / close)`` and ``log(rvol)`` (floored like the inputs)."""
    return np.stack([np.log(np.maximum(y[:, 0], FLOOR * last_close) / last_close),
                     np.log(np.maximum(y[:, 1], FLOOR))], axis=1)


def har_design(lookback: int, lags=HAR_LAGS) -> np.ndarray:
    """``[lookback, len(lags)]``: column j averages the last ``lags[j]`` entries of a window."""
    m = np.zeros((lookback, len(lags)))
    for j, k in enumerate(lags):
        m[lookback - k :, j] = 1.0 / k
    return m


def ewma_weights(lookback: int, lam: float) -> np.ndarray:
    """Window weights (oldest first) of an exponentially weighted mean, truncated and normalised."""
    w = lam ** np.arange(lookback - 1, -1, -1, dtype=np.float64)
    return w / w.sum()


@dataclass
class LinearLogModel:
    """``log(target) = x_window @ weights + bias``; ``price_scaled[j]``: target j is ``exp(..) * close``."""

    name: str
    weights: np.ndarray  # [lookback, T]
    bias: np.ndarray  # [T]
    price_scaled: tuple[bool, ...] = (True, False)
    params: dict = field(default_factory=dict)
    quantiles: np.ndarray | None = None  # [T, 3] conformal log-residual quantiles (10, 50, 90 %)

    def predict_log(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weights + self.bias

    def predict(self, x: np.ndarray, last_close: np.ndarray) -> np.ndarray:
        return to_levels(self.predict_log(x), last_close, self.price_scaled)


def to_levels(log_pred: np.ndarray, last_close: np.ndarray, price_scaled=(True, False)) -> np.ndarray:
    mult = np.where(np.asarray(price_scaled)[None, :], last_close[:, None], 1.0)
    return np.exp(log_pred) * mult


def _lstsq(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    design = np.column_stack([np.ones(len(z)), z])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    return coef  # [1 + k, T]


def fit_har(x_train: np.ndarray, ylog_train: np.ndarray, lags=HAR_LAGS) -> LinearLogModel:
    lookback = x_train.shape[1]
    design = har_design(lookback, lags)
    coef = _lstsq(x_train @ design, ylog_train)
    return LinearLogModel("har", design @ coef[1:], coef[0], params=dict(lags=list(lags), coef=coef.tolist()))


def fit_ewma_opt(x_train, ylog_train, x_val, ylog_val, grid=EWMA_GRID) -> LinearLogModel:
    lookback = x_train.shape[1]
    best = None
    for lam in grid:
        w = ewma_weights(lookback, lam)
        coef = _lstsq((x_train @ w)[:, None], ylog_train)  # [2, T]
        pred = (x_val @ w)[:, None] * coef[1][None, :] + coef[0][None, :]
        score = float(np.mean(np.abs(pred - ylog_val)))  # validation MAE in logs (the median's loss)
        if best is None or score < best[0]:
            best = (score, lam, w, coef)
    _, lam, w, coef = best
    return LinearLogModel("ewma-opt", w[:, None] * coef[1][None, :], coef[0],
                          params=dict(decay=lam, grid=list(grid), level=coef[0].tolist(), slope=coef[1].tolist()))


def baselines(hl_c: np.ndarray, n_vol: int, lam: float = RISKMETRICS) -> dict[str, np.ndarray]:
    """``hl_c``: windows ``[n, L, 3]`` of high, low, close. Each baseline: ``[n, 2]`` levels."""
    high, low, close = hl_c[..., 0], hl_c[..., 1], hl_c[..., 2]
    rng = high - low
    r = np.diff(np.log(close), axis=1)  # [n, L-1]
    pers = np.stack([rng[:, -1], np.sqrt(np.sum(r[:, -n_vol:] ** 2, axis=1))], axis=1)
    w_rng = ewma_weights(rng.shape[1], lam)
    w_ret = ewma_weights(r.shape[1], lam)
    ewma = np.stack([rng @ w_rng, np.sqrt(n_vol * ((r**2) @ w_ret))], axis=1)
    return {"persistence": pers, "ewma": ewma}


# ------------------------------------------------------------------------------------------- ONNX

def export_onnx(model: LinearLogModel, lookback: int, path: str | Path, opset: int = 18) -> Path:
    """Graph: ``features`` [batch, lookback, 3] float64 (high, low, close, raw) ->
    ``forecast`` [batch, T] float64 (levels) and, when the model has them, ``quantiles``
    [batch, T, 3] float64 (10 / 50 / 90 % levels from the conformal log-residual quantiles)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    T = model.weights.shape[1]
    c = lambda name, arr: numpy_helper.from_array(np.asarray(arr), name)  # noqa: E731
    inits = [
        c("i_high", np.array([0], dtype=np.int64)), c("i_low", np.array([1], dtype=np.int64)),
        c("i_close", np.array([2], dtype=np.int64)), c("i_last", np.array([lookback - 1], dtype=np.int64)),
        c("floor", np.array(FLOOR, dtype=np.float64)), c("W", model.weights.astype(np.float64)),
        c("b", model.bias.astype(np.float64)), c("ax2", np.array([2], dtype=np.int64)),
        c("mask", np.asarray(model.price_scaled, dtype=np.float64)),
        c("one_minus_mask", 1.0 - np.asarray(model.price_scaled, dtype=np.float64)),
    ]
    nodes = [
        helper.make_node("Gather", ["features", "i_high"], ["h3"], axis=2),
        helper.make_node("Gather", ["features", "i_low"], ["l3"], axis=2),
        helper.make_node("Gather", ["features", "i_close"], ["c3"], axis=2),
        helper.make_node("Squeeze", ["h3", "ax2"], ["h"]),
        helper.make_node("Squeeze", ["l3", "ax2"], ["l"]),
        helper.make_node("Squeeze", ["c3", "ax2"], ["c"]),
        helper.make_node("Sub", ["h", "l"], ["rng"]),
        helper.make_node("Mul", ["c", "floor"], ["rng_floor"]),
        helper.make_node("Max", ["rng", "rng_floor"], ["rng_f"]),
        helper.make_node("Div", ["rng_f", "c"], ["rel"]),
        helper.make_node("Log", ["rel"], ["x"]),  # [B, L]
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["logp"]),  # [B, T]
        helper.make_node("Gather", ["c", "i_last"], ["last"], axis=1),  # [B, 1]
        helper.make_node("Mul", ["last", "mask"], ["lm"]),
        helper.make_node("Add", ["lm", "one_minus_mask"], ["mult"]),  # [B, T]: close or 1
        helper.make_node("Exp", ["logp"], ["elogp"]),
        helper.make_node("Mul", ["elogp", "mult"], ["forecast"]),
    ]
    outputs = [helper.make_tensor_value_info("forecast", TensorProto.DOUBLE, ["batch", T])]
    if model.quantiles is not None:
        inits.append(c("Q", model.quantiles.astype(np.float64)))  # [T, 3]
        nodes += [
            helper.make_node("Unsqueeze", ["logp", "ax2"], ["logp3"]),  # [B, T, 1]
            helper.make_node("Add", ["logp3", "Q"], ["logq"]),  # [B, T, 3]
            helper.make_node("Exp", ["logq"], ["elogq"]),
            helper.make_node("Unsqueeze", ["mult", "ax2"], ["mult3"]),
            helper.make_node("Mul", ["elogq", "mult3"], ["quantiles"]),
        ]
        outputs.append(helper.make_tensor_value_info("quantiles", TensorProto.DOUBLE, ["batch", T, 3]))
    graph = helper.make_graph(
        nodes, f"klinebus-{model.name}",
        [helper.make_tensor_value_info("features", TensorProto.DOUBLE, ["batch", lookback, len(COLUMNS)])],
        outputs, initializer=inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="klinebus")
    m.ir_version = 9
    onnx.checker.check_model(m, full_check=True)
    path = Path(path)
    onnx.save(m, str(path))
    return path
