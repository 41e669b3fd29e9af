"""The advice scorecard: every number beside three baselines, each with a 95 % interval.

Scored on the same items as the model:

* ``random``: a uniform draw among BUY / NOOP / SELL per item (seeded by the item id, so the
  same items always get the same draws) and an open change drawn from the training split's
  changes: the "random generator" seed 003 compared itself to (expected accuracy 1/3);
* ``majority``: the training split's most common advice, and the training split's median open
  change (the constant with the least absolute error on training data);
* ``last minute``: the advice the label rule gives the last context minute, and that minute's
  open change (persistence).

Intervals: Wilson score for proportions (accuracy, precision, recall: sound at 0 % and 100 % and
for small counts, unlike the normal approximation); mean ± 1.96 standard errors for the MAE
(a normal approximation to the mean of absolute errors, fine for the tens of items and more a
scorecard needs). An answer that does not parse counts as wrong and is left out of the MAE.
"""

from __future__ import annotations

import math
import random
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from services.trainer.advice.prompt import ADVICES
from services.trainer.evaluation import WILSON_Z, wilson_interval

INVALID = "INVALID"


def wilson(successes: int, n: int) -> tuple[float, float] | None:
    """The trainer's Wilson score interval; None when there is nothing to count."""
    return wilson_interval(successes, n) if n > 0 else None


def mean_interval(values: Sequence[float], z: float = WILSON_Z) -> tuple[float, tuple[float, float] | None] | None:
    """Mean and its normal-approximation interval (None below two values)."""
    if len(values) == 0:
        return None
    arr = np.asarray(values, dtype=np.float64)
    mean = float(arr.mean())
    if len(arr) < 2:
        return mean, None
    half = z * float(arr.std(ddof=1)) / math.sqrt(len(arr))
    return mean, (mean - half, mean + half)


def score(
    actual: Sequence[str],
    predicted: Sequence[str | None],
    actual_change: Sequence[float],
    predicted_change: Sequence[float | None],
    symbols: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Accuracy, the actual-vs-predicted table, per-class precision/recall and the MAE."""
    n = len(actual)
    if not (len(predicted) == len(actual_change) == len(predicted_change) == n):
        raise ValueError("score: every sequence needs one entry per item")
    shown = [p if p in ADVICES else INVALID for p in predicted]
    correct = sum(a == p for a, p in zip(actual, shown))
    confusion = {a: {p: 0 for p in (*ADVICES, INVALID)} for a in ADVICES}
    for a, p in zip(actual, shown):
        confusion[a][p] += 1
    per_class = {}
    for c in ADVICES:
        matches = confusion[c][c]
        n_actual = sum(confusion[c].values())
        n_pred = sum(confusion[a][c] for a in ADVICES)
        per_class[c] = {
            "actual": n_actual,
            "predicted": n_pred,
            "matches": matches,
            "precision": matches / n_pred if n_pred else None,
            "precision_ci": wilson(matches, n_pred),
            "recall": matches / n_actual if n_actual else None,
            "recall_ci": wilson(matches, n_actual),
        }
    errors = [abs(p - a) for a, p in zip(actual_change, predicted_change) if p is not None and math.isfinite(p)]
    mae = mean_interval(errors)
    out: dict[str, Any] = {
        "n": n,
        "invalid": sum(s == INVALID for s in shown),
        "correct": correct,
        "accuracy": correct / n if n else None,
        "accuracy_ci": wilson(correct, n),
        "confusion": confusion,
        "per_class": per_class,
        "mae": mae[0] if mae else None,
        "mae_ci": mae[1] if mae else None,
        "mae_n": len(errors),
    }
    if symbols is not None and len(set(symbols)) > 1:
        by: dict[str, list[float]] = {}
        for s, a, p in zip(symbols, actual_change, predicted_change):
            if p is not None and math.isfinite(p):
                by.setdefault(s, []).append(abs(p - a))
        out["mae_by_symbol"] = {s: float(np.mean(v)) for s, v in sorted(by.items())}
    return out


def baselines(items: pd.DataFrame, train: pd.DataFrame, seed: int) -> dict[str, dict[str, Any]]:
    """The three baselines' predictions (advice, change) for ``items``; ``train`` sets the
    majority class, the median change and the pool random changes are drawn from."""
    counts = train["advice"].value_counts()
    # ties broken by the fixed class order, so the choice never depends on dict order
    majority = max(ADVICES, key=lambda a: (int(counts.get(a, 0)), -ADVICES.index(a)))
    median_change = float(train["open_change"].median())
    pool = train["open_change"].to_numpy(np.float64)
    rnd_advice, rnd_change = [], []
    for item_id in items["id"]:
        rng = random.Random(f"random-baseline:{seed}:{item_id}")
        rnd_advice.append(rng.choice(ADVICES))
        rnd_change.append(float(pool[rng.randrange(len(pool))]))
    return {
        "random": {"label": "random (uniform)", "advice": rnd_advice, "change": rnd_change},
        "majority": {"label": f"majority ({majority})", "advice": [majority] * len(items),
                     "change": [median_change] * len(items)},
        "last_minute": {"label": "same as last minute", "advice": list(items["prev_advice"]),
                        "change": [float(x) for x in items["prev_open_change"]]},
    }


def scorecard(
    items: pd.DataFrame,
    answers: Mapping[str, Mapping[str, Any]],
    train: pd.DataFrame,
    seed: int,
    model_name: str,
) -> dict[str, Any]:
    """The model's score on the answered ``items`` and each baseline's on the very same items."""
    done = items[items["id"].isin(answers.keys())].reset_index(drop=True)
    actual = list(done["advice"])
    actual_change = [float(x) for x in done["open_change"]]
    symbols = list(done["symbol"])
    recs = [answers[i] for i in done["id"]]
    model = score(actual, [r.get("advice") for r in recs], actual_change,
                  [r.get("predicted_open_change") for r in recs], symbols)
    seconds = [float(r["seconds"]) for r in recs if r.get("seconds") is not None]
    model["label"] = model_name
    model["seconds_per_item"] = float(np.mean(seconds)) if seconds else None
    return {"n": len(done), "model": model, "baselines": score_baselines(done, train, seed)}


def score_baselines(items: pd.DataFrame, train: pd.DataFrame, seed: int) -> dict[str, dict[str, Any]]:
    """Each baseline's score on ``items`` (they need no model: the whole verify split costs nothing)."""
    actual = list(items["advice"])
    actual_change = [float(x) for x in items["open_change"]]
    symbols = list(items["symbol"])
    out = {}
    for key, b in baselines(items, train, seed).items():
        s = score(actual, b["advice"], actual_change, b["change"], symbols)
        s["label"] = b["label"]
        out[key] = s
    return out


# --- text ---------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _ci(ci: tuple[float, float] | None, pct: bool = True) -> str:
    if ci is None:
        return "[-]"
    return f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if pct else f"[{ci[0]:.8g}, {ci[1]:.8g}]"


def render(card: Mapping[str, Any]) -> str:
    """The scorecard as plain text (fits a terminal and a log line-by-line)."""
    rows = [card["model"], *card["baselines"].values()]
    width = max(len(r["label"]) for r in rows) + 2
    lines = [f"advice scorecard: {card['n']} items"]
    lines.append(f"{'':{width}}{'accuracy [95% CI]':<26}{'MAE open change [95% CI]':<40}invalid")
    for r in rows:
        mae = "-" if r["mae"] is None else f"{r['mae']:.8g} {_ci(r['mae_ci'], pct=False)}"
        lines.append(f"{r['label']:<{width}}{_pct(r['accuracy']) + ' ' + _ci(r['accuracy_ci']):<26}{mae:<40}{r['invalid']}")
    m = card["model"]
    lines.append("")
    lines.append("model: actual vs predicted (the seed's table)")
    lines.append(f"{'':8}{'actual':>8}{'predicted':>11}{'matches':>9}")
    for c in ADVICES:
        pc = m["per_class"][c]
        lines.append(f"{c:<8}{pc['actual']:>8}{pc['predicted']:>11}{pc['matches']:>9}")
    lines.append("")
    lines.append("confusion (rows actual, columns predicted)")
    cols = (*ADVICES, INVALID)
    lines.append(f"{'':8}" + "".join(f"{c:>9}" for c in cols))
    for a in ADVICES:
        lines.append(f"{a:<8}" + "".join(f"{m['confusion'][a][c]:>9}" for c in cols))
    lines.append("")
    for measure in ("precision", "recall"):
        lines.append("")
        lines.append(f"{measure} per class [95% CI]")
        lines.append(f"{'':{width}}" + "".join(f"{c:<22}" for c in ADVICES))
        for r in rows:
            cells = [f"{_pct(r['per_class'][c][measure])} {_ci(r['per_class'][c][measure + '_ci'])}" for c in ADVICES]
            lines.append(f"{r['label']:<{width}}" + "".join(f"{c:<22}" for c in cells))
    if "mae_by_symbol" in m:
        lines.append("")
        lines.append("MAE by symbol (quote currency; symbols' price scales differ): "
                     + ", ".join(f"{s} {v:.8g}" for s, v in m["mae_by_symbol"].items()))
    full = card.get("baselines_whole_split")
    if full:
        n = next(iter(full.values()))["n"]
        lines.append("")
        lines.append(f"baselines on the whole verify split ({n} items; accuracy [95% CI]): "
                     + ", ".join(f"{b['label']} {_pct(b['accuracy'])} {_ci(b['accuracy_ci'])}" for b in full.values()))
    if m.get("seconds_per_item") is not None:
        lines.append("")
        lines.append(f"seconds per item: {m['seconds_per_item']:.3f}")
    return "\n".join(lines)
