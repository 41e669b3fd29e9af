"""From a trained, exported and evaluated model to a published package (libs/common/model_package.py).

``stage_and_publish`` writes the package into a private staging folder, verifies it, then hands it
to the registry (which moves it in under the next version) and, when configured, to the Hugging Face
Hub. ``model_card`` writes README.md in the Hub's format: YAML front matter, then the data, the
parameters and every metric beside its baselines, whatever the numbers are.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from libs.common.model_package import HubPublisher, ModelPackage, PublishedPackage, Registry, write_package
from services.trainer.sources import fmt_ms


@dataclass
class PublishTargets:
    registry: str
    hub_repo_id: str | None = None
    hub_token: str | None = None
    hub_endpoint: str | None = None
    hub_private: bool = True


def _fmt(v: float) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if abs(v) >= 1000:
        return f"{v:,.2f}"
    return f"{v:.6g}"


def _table(card: dict[str, dict[str, float]], keys: list[str]) -> list[str]:
    cols = list(card)
    lines = ["| metric | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(_fmt(card[c].get(k)) if k in card[c] else "–" for c in cols) + " |")
    return lines


HEADLINE = ["mae", "rmse", "mse", "mape", "direction_accuracy", "direction_ci_low", "direction_ci_high",
            "flat_share", "range_mae", "accuracy", "accuracy_ci_low", "accuracy_ci_high", "macro_f1"]


def model_card(meta: ModelPackage, scorecards: dict[str, dict], extra_sections: list[str] | None = None) -> str:
    """``scorecards``: {"validation": card, "test": card, "folds": [...]}; every card as evaluation builds it."""
    pairs = ", ".join(f"{s.symbol} {s.interval}" for s in meta.serves)
    front = {
        "library_name": "onnx",
        "pipeline_tag": "time-series-forecasting" if meta.kind != "chart-classifier" else "image-classification",
        "tags": ["klinebus", meta.kind, "onnx", "crypto", "binance-klines"],
        "license": "mit",
        "model-index": [{
            "name": meta.name,
            "results": [{
                "task": {"type": "time-series-forecasting" if meta.kind != "chart-classifier" else "image-classification"},
                "dataset": {"name": f"Binance klines {pairs}", "type": "binance-klines"},
                "metrics": [
                    {"type": k, "value": round(v, 8), "name": f"test {k}"}
                    for k, v in scorecards["test"]["model"].items() if k in HEADLINE and math.isfinite(v)
                ],
            }],
        }],
    }
    lines = ["---", json.dumps(front, indent=1), "---", "",  # JSON is valid YAML
             f"# {meta.name} v{meta.version}", "",
             f"**Promoted: {'yes' if meta.promoted else 'no'}.** {meta.promotion_reason}", "",
             f"Kind `{meta.kind}`, trained by klinebus {meta.code_version}. Serves {pairs}.", "",
             "## Data", "",
             f"- Feature set `{meta.feature_set}`: {len(meta.features)} features, window of {meta.lookback} candles "
             f"({', '.join(meta.features)}).",
             ]
    if meta.skipped_features:
        lines.append("- Left out for lack of history: " + "; ".join(f"`{k}` ({v})" for k, v in meta.skipped_features.items()))
    r = meta.ranges
    for name, tr in (("train", r.train), ("validation", r.validation), ("test", r.test)):
        lines.append(f"- {name}: {fmt_ms(tr.start)} → {fmt_ms(tr.end)} UTC, {tr.rows} samples")
    lines += [f"- Embargo of {r.embargo} candles between slices; scalers fitted on train only.",
              f"- Forecasts {', '.join(meta.targets)} at horizons {meta.horizons} (candles ahead).", "",
              "## Inputs and outputs", ""]
    for t in meta.inputs:
        lines.append(f"- input `{t.name}` {t.dtype} {t.shape}: {t.meaning}")
    for t in meta.outputs:
        lines.append(f"- output `{t.name}` {t.dtype} {t.shape}: {t.meaning}")
    lines += ["", "## Parameters", "", "```json", json.dumps(meta.config, indent=1, default=str), "```", ""]
    for split in ("validation", "test"):
        card = scorecards[split]
        lines += [f"## {split.capitalize()} slice: model beside baselines", ""]
        lines += _table(card, [k for k in HEADLINE if any(k in c for c in card.values())])
        lines.append("")
    steps = [k for k in scorecards["test"]["model"] if "@" in k and k.endswith("_mae")]
    if steps:
        lines += ["## Test error per target and step (MAE)", ""]
        lines += _table({k: v for k, v in scorecards["test"].items() if k in ("model", "persistence", "drift")}, steps)
        lines.append("")
    folds = scorecards.get("folds") or []
    if folds:
        lines += ["## Walk-forward over the test slice (consecutive folds)", "",
                  "| fold | from | to | model MAE | persistence MAE | model direction acc. |", "|---|---|---|---|---|---|"]
        for f in folds:
            c = f["card"]
            lines.append(f"| {f['fold']} | {fmt_ms(f['start'])} | {fmt_ms(f['end'])} | {_fmt(c['model']['mae'])} | "
                         f"{_fmt(c['persistence']['mae'])} | {_fmt(c['model'].get('direction_accuracy'))} |")
        lines.append("")
    lines += ["## Baselines", "",
              "- persistence: next value = last value (open and close: last close; high/low: last high/low).",
              "- drift: last close times the train slice's mean log return for that target and step.",
              "- majority_direction: always the move (up/down) the train slice saw more often.",
              "- Direction accuracy counts only candles whose close moved; `flat_share` is the share that did not; "
              "the interval is a 95 % Wilson interval.", ""]
    lines += extra_sections or []
    return "\n".join(lines) + "\n"


def stage_and_publish(meta: ModelPackage, onnx_file: Path, card_for: Callable[[ModelPackage], str],
                      targets: PublishTargets, tokenizer_dir: Path | None = None,
                      ) -> tuple[PublishedPackage, PublishedPackage | None]:
    """Write, verify, publish to the registry (and the Hub when configured); nothing half-written stays.

    ``card_for(meta)`` writes the model card for the version the registry is about to give.
    """
    registry = Registry(targets.registry)
    staging = Path(tempfile.mkdtemp(prefix="klinebus-package-"))
    try:
        meta = meta.model_copy(update={"version": registry.next_version(meta.name)})
        pkg_dir = staging / meta.name
        write_package(pkg_dir, meta, onnx_file, card_for(meta), tokenizer_dir)
        published = registry.publish(pkg_dir)
        hub = None
        if targets.hub_repo_id and targets.hub_token:
            if published.version != meta.version:  # another publisher took the version meanwhile
                pkg_dir = staging / f"{meta.name}-v{published.version}"
                write_package(pkg_dir, published.meta, onnx_file, card_for(published.meta), tokenizer_dir)
            hub = HubPublisher(targets.hub_repo_id, targets.hub_token, targets.hub_endpoint, targets.hub_private).publish(pkg_dir)
        return published, hub
    finally:
        shutil.rmtree(staging, ignore_errors=True)
