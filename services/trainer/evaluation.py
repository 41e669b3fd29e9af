"""Honest scorecards: every model metric beside naive baselines, on slices later than training saw.

Forecasts (``forecast_scorecard``): the seeds' MSE, MAE and MAPE on prices, RMSE, per target and
per step; directional accuracy of the next close with a 95 % Wilson interval and the share of flat
moves; next-candle range error. Baselines:

* ``persistence``: the next value is the last one (open, close: the last close, since a candle opens
  where the last one closed; high, low: the last high and low).
* ``drift``: the last close moved by the mean log return the train slice showed for that target
  and step (a random walk with drift; for high/low their mean offset from the close).
* ``majority_direction``: always the direction (up/down) the train slice saw more often.

Classifiers (``classification_scorecard``): accuracy and macro F1 beside the majority class.

Forecasters are promoted by ``gated_promotion``: on the gate slice (after validation, which early
stopping and LR decay used; never trained or tuned on) the model must beat persistence on every
``paired_verdict`` (lower MAE *and* a one-sided Diebold-Mariano test with the HLN correction at
``DM_ALPHA``), and on the later test slice it must lose on none. Each verdict carries the MAE ratio
with a moving-block bootstrap 95 % interval and the mean difference with a DM-based one.
``promotion`` is the older single-slice rule the chart classifier still uses. ``walk_forward``
scores consecutive folds of the test slice one after another. ``conformal_log_quantiles`` and
``interval_report`` calibrate and check the 80 % prediction intervals.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

WILSON_Z = 1.959963984540054  # two-sided 95 %
PRICE_INDEX = {"open": 0, "high": 1, "low": 2, "close": 3}


def wilson_interval(successes: int, n: int, z: float = WILSON_Z) -> tuple[float, float]:
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def error_metrics(pred: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    err = pred - actual
    mse = float(np.mean(err**2))
    return {
        "mse": mse,
        "rmse": math.sqrt(mse),
        "mae": float(np.mean(np.abs(err))),
        "mape": float(np.mean(np.abs(err) / np.abs(actual)) * 100.0),
    }


def direction_metrics(pred_close: np.ndarray, actual_close: np.ndarray, last_close: np.ndarray) -> dict[str, float]:
    """Accuracy of the sign of the next close's move, on the moves that were not flat."""
    actual_move = np.sign(actual_close - last_close)
    moved = actual_move != 0
    n = int(moved.sum())
    hits = int((np.sign(pred_close - last_close)[moved] == actual_move[moved]).sum())
    lo, hi = wilson_interval(hits, n)
    return {
        "direction_accuracy": hits / n if n else float("nan"),
        "direction_ci_low": lo,
        "direction_ci_high": hi,
        "direction_n": float(n),
        "flat_share": float(1 - n / len(actual_move)) if len(actual_move) else float("nan"),
    }


def persistence_forecast(last_prices: np.ndarray, targets: Sequence[str], steps: int) -> np.ndarray:
    """``[n, steps, targets]``: open/close -> last close; high/low -> last high/low."""
    src = [PRICE_INDEX["close"] if t in ("open", "close") else PRICE_INDEX[t] for t in targets]
    one = last_prices[:, src]
    return np.repeat(one[:, None, :], steps, axis=1)


def drift_forecast(last_close: np.ndarray, drift: np.ndarray) -> np.ndarray:
    """``drift[steps, targets]``: mean train log returns against the last close."""
    return last_close[:, None, None] * np.exp(drift[None, :, :])


def _scores(pred: np.ndarray, actual: np.ndarray, last_prices: np.ndarray, targets: Sequence[str], horizons: Sequence[int]) -> dict[str, float]:
    out = error_metrics(pred, actual)
    for j, t in enumerate(targets):
        for k, h in enumerate(horizons):
            for name, v in error_metrics(pred[:, k, j], actual[:, k, j]).items():
                if name != "mse":
                    out[f"{t}@{h}_{name}"] = v
    if "close" in targets:
        c = list(targets).index("close")
        out.update(direction_metrics(pred[:, 0, c], actual[:, 0, c], last_prices[:, PRICE_INDEX["close"]]))
    if "high" in targets and "low" in targets:
        hi, lo = list(targets).index("high"), list(targets).index("low")
        rng_pred, rng_act = pred[:, 0, hi] - pred[:, 0, lo], actual[:, 0, hi] - actual[:, 0, lo]
        out["range_mae"] = float(np.mean(np.abs(rng_pred - rng_act)))
    return out


def forecast_scorecard(
    pred: np.ndarray,
    actual: np.ndarray,
    last_prices: np.ndarray,
    targets: Sequence[str],
    horizons: Sequence[int],
    drift: np.ndarray,
    train_up_share: float,
) -> dict[str, dict[str, float]]:
    """``{"model": {...}, "persistence": {...}, "drift": {...}, "majority_direction": {...}}``.

    ``pred``/``actual``: prices ``[n, horizons, targets]``; ``last_prices``: the anchor candles'
    open, high, low, close ``[n, 4]``.
    """
    steps = len(horizons)
    last_close = last_prices[:, PRICE_INDEX["close"]]
    card = {
        "model": _scores(pred, actual, last_prices, targets, horizons),
        "persistence": _scores(persistence_forecast(last_prices, targets, steps), actual, last_prices, targets, horizons),
        "drift": _scores(drift_forecast(last_close, drift), actual, last_prices, targets, horizons),
    }
    # Persistence forecasts no move at all: its "direction" is never right, so leave it out.
    for k in [k for k in card["persistence"] if k.startswith("direction") or k == "flat_share"]:
        del card["persistence"][k]
    if "close" in targets:
        c = list(targets).index("close")
        up = train_up_share >= 0.5
        guess = last_close + (1.0 if up else -1.0)
        card["majority_direction"] = {
            k: v for k, v in direction_metrics(guess, actual[:, 0, c], last_close).items() if k != "flat_share"
        }
        card["majority_direction"]["up"] = float(up)
    card["model"]["samples"] = float(len(pred))
    return card


def classification_scorecard(pred: np.ndarray, actual: np.ndarray, train_labels: np.ndarray, n_classes: int) -> dict[str, dict[str, float]]:
    """Accuracy (with its Wilson interval) and macro F1 beside always answering the train slice's majority class."""
    majority = int(np.bincount(train_labels, minlength=n_classes).argmax())

    def score(p: np.ndarray) -> dict[str, float]:
        hits = int((p == actual).sum())
        lo, hi = wilson_interval(hits, len(actual))
        f1s = []
        for c in range(n_classes):
            tp = int(((p == c) & (actual == c)).sum())
            fp = int(((p == c) & (actual != c)).sum())
            fn = int(((p != c) & (actual == c)).sum())
            f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
        return {"accuracy": hits / len(actual) if len(actual) else float("nan"), "accuracy_ci_low": lo,
                "accuracy_ci_high": hi, "macro_f1": float(np.mean(f1s)), "samples": float(len(actual))}

    return {"model": score(pred), "majority_class": score(np.full_like(actual, majority)) | {"class": float(majority)}}


def walk_forward(order_key: np.ndarray, folds: int, score) -> list[dict]:
    """Score ``folds`` consecutive slices (by ``order_key``, e.g. anchor time); ``score(idx)`` -> scorecard."""
    order = np.argsort(order_key, kind="stable")
    if len(order) < folds * 2:
        folds = 1
    out = []
    for k, idx in enumerate(np.array_split(order, folds), start=1):
        card = score(idx)
        out.append({"fold": k, "start": int(order_key[idx].min()), "end": int(order_key[idx].max()), "card": card})
    return out


def promotion(card: dict[str, dict[str, float]], metric: str = "mae", baseline: str = "persistence",
              lower_is_better: bool = True, split: str = "validation", also: Sequence[str] = ()) -> tuple[bool, str]:
    """Promoted only if the model beats the baseline on ``metric`` and on every metric in ``also``
    (the forecasters add ``close@1_mae``: a model that wins on average through its high/low heads but
    loses on the next close has not beaten persistence where it matters). The reason says by how much."""
    parts, wins = [], True
    for name in (metric, *also):
        m, b = card["model"].get(name, float("nan")), card[baseline].get(name, float("nan"))
        if not (math.isfinite(m) and math.isfinite(b)):
            wins = False
            parts.append(f"{split} {name} is not finite (model {m}, {baseline} {b})")
            continue
        ok = m < b if lower_is_better else m > b
        wins = wins and ok
        rel = (m / b - 1) * 100 if b else float("nan")
        parts.append(f"{split} {name} {m:.6g} {'beats' if ok else 'does not beat'} {baseline} {b:.6g} ({rel:+.2f} %)")
    return wins, "; ".join(parts) + ("; promoted" if wins else "; stored, not promoted")


# ------------------------------------------------------------------ gate / test verdicts, intervals

DM_ALPHA = 0.05  # the stated level of the paired test
INTERVAL_QUANTILES = (0.1, 0.5, 0.9)  # the 10-90 % band is an 80 % prediction interval


def paired_verdict(err_model: np.ndarray, err_base: np.ndarray, name: str, baseline: str = "persistence",
                   h: int = 1, alpha: float = DM_ALPHA, seed: int = 0) -> dict:
    """Model against a baseline on the same rows, absolute-error loss: MAEs, their ratio with a
    moving-block bootstrap 95 % interval, the mean loss difference with its DM-based 95 % interval,
    and the HLN-corrected Diebold-Mariano test (Bartlett HAC variance; one-sided p for "the model's
    loss is lower"). ``beats``: lower MAE *and* p < alpha. ``loses``: higher MAE (point estimate)."""
    from services.trainer.stats import dm_test_hac, mae_ratio_ci

    lm, lb = np.abs(np.asarray(err_model, dtype=np.float64)), np.abs(np.asarray(err_base, dtype=np.float64))
    dm = dm_test_hac(lm, lb, h=h)
    ratio, lo, hi = mae_ratio_ci(lm, lb, seed=seed)
    m, b = float(lm.mean()), float(lb.mean())
    return dict(
        metric=name, baseline=baseline, n=int(len(lm)), model_mae=m, baseline_mae=b,
        mae_ratio=ratio, mae_ratio_ci_low=lo, mae_ratio_ci_high=hi,
        mae_diff=dm.mean_diff, mae_diff_ci_low=dm.ci_low, mae_diff_ci_high=dm.ci_high,
        dm_statistic=dm.statistic, dm_p_value=dm.p_less, dm_lags=dm.lags, dm_horizon=h, alpha=alpha,
        beats=bool(m < b and dm.p_less < alpha), loses=bool(m > b),
    )


def _verdict_line(split: str, v: dict) -> str:
    return (f"{split} {v['metric']}: MAE {v['model_mae']:.6g} vs {v['baseline']} {v['baseline_mae']:.6g} "
            f"(ratio {v['mae_ratio']:.3f}, 95 % CI {v['mae_ratio_ci_low']:.3f}-{v['mae_ratio_ci_high']:.3f}; "
            f"DM-HLN {v['dm_statistic']:.2f}, p {v['dm_p_value']:.3g})")


def gated_promotion(gate: list[dict], test: list[dict], alpha: float = DM_ALPHA) -> tuple[bool, str]:
    """Promoted only if, on the gate slice (never trained or tuned on), the model beats the baseline
    on every verdict with a significant DM test at ``alpha``, *and* on the later test slice it loses
    on none (its MAE is not higher). The reason states every number it rests on."""
    gate_ok = all(v["beats"] for v in gate)
    test_ok = not any(v["loses"] for v in test)
    parts = [_verdict_line("gate", v) + (" beats" if v["beats"] else " does not beat") + f" at {alpha:.0%}" for v in gate]
    parts += [_verdict_line("test", v) + (" loses" if v["loses"] else " does not lose") for v in test]
    if gate_ok and test_ok:
        tail = "promoted"
    elif not gate_ok:
        tail = "stored, not promoted (no significant win on the gate slice)"
    else:
        tail = "stored, not promoted (won on gate, lost on test)"
    return gate_ok and test_ok, "; ".join(parts) + "; " + tail


def conformal_log_quantiles(log_residuals: np.ndarray, quantiles=INTERVAL_QUANTILES) -> np.ndarray:
    """``[..., len(quantiles)]`` split-conformal quantiles of ``log(actual / forecast)`` per column
    (residuals ``[n, ...]``, calibration rows on axis 0)."""
    from services.trainer.stats import conformal_quantile

    r = np.asarray(log_residuals, dtype=np.float64)
    flat = r.reshape(len(r), -1)
    out = np.array([[conformal_quantile(flat[:, j], q) for q in quantiles] for j in range(flat.shape[1])])
    return out.reshape(*r.shape[1:], len(quantiles))


def interval_report(actual: np.ndarray, lower: np.ndarray, upper: np.ndarray, center: np.ndarray) -> dict:
    """Coverage of ``[lower, upper]`` with a 95 % moving-block bootstrap interval (misses cluster in
    volatile spells, and multi-candle targets overlap, so a Wilson interval would be too narrow), and
    the mean width relative to ``center``."""
    from services.trainer.stats import block_bootstrap_ci

    inside = ((actual >= lower) & (actual <= upper)).astype(np.float64)
    n, hits = int(inside.size), int(inside.sum())
    lo, hi = block_bootstrap_ci((inside,), np.mean) if n else (float("nan"), float("nan"))
    return dict(coverage=hits / n if n else float("nan"), coverage_ci_low=lo, coverage_ci_high=hi, n=n,
                mean_rel_width=float(np.mean((upper - lower) / np.abs(center))) if n else float("nan"))
