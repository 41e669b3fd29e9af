"""The scorecard: the model beside naive baselines on the same samples, and the promotion rule,
built on the trainer's evaluation (services/trainer/evaluation.py).

Cards have the trainer's shape (``{"model": {...}, baseline: {...}}``, numbers only), so the
trainer's model card renders them:

* classes: accuracy (with its 95 % Wilson interval) and macro-F1 of the model, of the train
  split's majority class, and of ``same_as_last_candle`` (the last candle's own move classified
  with the same band);
* next close: MAE / RMSE / MSE / MAPE in price units of the model and of ``persistence`` (next
  close = last close).

Confusion matrices (rows true, columns predicted, bearish / neutral / bullish) sit beside the
cards. Promotion is the trainer's rule applied to each baseline on the validation split (never
test): the model's accuracy must beat the majority class's and the last candle's, and its
next-close MAE persistence's; the package records every verdict.
"""

from __future__ import annotations

import numpy as np

from services.trainer.classifier.labels import CLASS_NAMES, unscale_target
from services.trainer.evaluation import classification_scorecard, error_metrics, promotion

K = len(CLASS_NAMES)


def confusion(y_true: np.ndarray, y_pred: np.ndarray) -> list[list[int]]:
    m = np.zeros((K, K), dtype=np.int64)
    np.add.at(m, (np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)), 1)
    return m.tolist()


def split_scorecard(
    labels: np.ndarray,
    last_labels: np.ndarray,
    train_labels: np.ndarray,
    close: np.ndarray,
    next_close: np.ndarray,
    probs: np.ndarray,
    forecast_scaled: np.ndarray,
    scale: float,
) -> tuple[dict[str, dict[str, float]], dict[str, list[list[int]]]]:
    """(card, confusion matrices) for one split."""
    pred = probs.argmax(axis=1)
    classes = classification_scorecard(pred, labels, train_labels, K)
    last = classification_scorecard(last_labels, labels, train_labels, K)["model"]
    pred_close = unscale_target(close, forecast_scaled.astype(np.float64), scale)
    card = {
        "model": {**classes["model"], **error_metrics(pred_close, next_close)},
        "majority_class": classes["majority_class"],
        "same_as_last_candle": last,
        "persistence": error_metrics(close, next_close),
    }
    majority = np.full(len(labels), int(classes["majority_class"]["class"]))
    matrices = {
        "model": confusion(labels, pred),
        "majority_class": confusion(labels, majority),
        "same_as_last_candle": confusion(labels, last_labels),
    }
    return card, matrices


def promote(validation: dict[str, dict[str, float]]) -> tuple[bool, str]:
    verdicts = [
        promotion(validation, "accuracy", "majority_class", lower_is_better=False),
        promotion(validation, "accuracy", "same_as_last_candle", lower_is_better=False),
        promotion(validation, "mae", "persistence"),
    ]
    ok = all(v for v, _ in verdicts)
    reasons = "; ".join(r.split("; ")[0] for _, r in verdicts)
    return ok, f"{reasons}; {'promoted' if ok else 'stored, not promoted'}"


def flat_metrics(cards: dict[str, dict[str, dict[str, float]]]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """``klinebus.json``'s ``metrics`` and ``baseline_metrics``: every number, keyed ``<split>_<metric>``."""
    metrics: dict[str, float] = {}
    baselines: dict[str, dict[str, float]] = {}
    for split, card in cards.items():
        for who, values in card.items():
            dest = metrics if who == "model" else baselines.setdefault(who, {})
            dest.update({f"{split}_{k}": float(v) for k, v in values.items()})
    return metrics, baselines
