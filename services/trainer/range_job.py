"""Training job for ``range-vol`` datasets: fit the HAR and the decay-optimised EWMA on train, pick
one on validation, calibrate 80 % split-conformal intervals on the gate slice, decide promotion on
the gate slice (paired DM test against persistence), confirm on the test slice, export the linear
graph to ONNX, check onnxruntime against numpy, publish.

Every model and baseline is scored on the same rows; each headline MAE ratio has a block-bootstrap
95 % interval and each difference a DM-based one.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from libs.common.model_package import ModelPackage, Ranges, Served, TensorSpec, TimeRange, code_version
from services.trainer.datasets import read_manifest
from services.trainer.evaluation import (
    DM_ALPHA,
    INTERVAL_QUANTILES,
    conformal_log_quantiles,
    gated_promotion,
    interval_report,
    paired_verdict,
)
from services.trainer.range_model import (
    COLUMNS,
    LinearLogModel,
    baselines,
    export_onnx,
    fit_ewma_opt,
    fit_har,
    log_rel_range,
    log_targets,
    targets,
    windows,
)

SERVING_FEATURE_SET = "all-v1"  # any stream set holding high, low, close serves the graph
MAX_REL_DIFF = 1e-9


@dataclass
class RangeSplit:
    hlc: np.ndarray  # [n, L, 3] raw high, low, close windows
    x: np.ndarray  # [n, L] log relative ranges
    y: np.ndarray  # [n, 2] levels: next range, realised vol over the next N
    last_close: np.ndarray
    anchor_time: np.ndarray
    series_id: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


def load_split(dataset_dir: Path, manifest: dict, name: str) -> RangeSplit:
    L, n_vol = manifest["lookback"], manifest["horizons"][1]
    parts = []
    for k, s in enumerate(manifest["series"]):
        z = np.load(Path(dataset_dir) / s["file"])
        p, ot, a = z["prices"], z["open_time"], z[f"anchors_{name}"]
        hlc = windows(p[:, 1:4], a, L)
        parts.append((hlc, targets(p, a, n_vol), p[a, 3], ot[a], np.full(len(a), k)))
    hlc, y, lc, at, sid = (np.concatenate(c) for c in zip(*parts))
    return RangeSplit(hlc, log_rel_range(hlc[..., 0], hlc[..., 1], hlc[..., 2]), y, lc, at, sid)


def scorecard(split: RangeSplit, preds: dict[str, np.ndarray], target_names: list[str]) -> dict[str, dict[str, float]]:
    out = {}
    for name, p in preds.items():
        row = {}
        for j, t in enumerate(target_names):
            err = p[:, j] - split.y[:, j]
            row[f"{t}_mae"] = float(np.mean(np.abs(err)))
            row[f"{t}_rmse"] = float(np.sqrt(np.mean(err**2)))
            row[f"{t}_mape"] = float(np.mean(np.abs(err) / np.maximum(np.abs(split.y[:, j]), 1e-12)) * 100)
        row["samples"] = float(len(split))
        out[name] = row
    return out


def run_models(models: dict[str, LinearLogModel], split: RangeSplit, n_vol: int) -> dict[str, np.ndarray]:
    preds = {name: m.predict(split.x, split.last_close) for name, m in models.items()}
    preds.update(baselines(split.hlc, n_vol))
    return preds


def train_range(dataset_dir: str | Path, options, progress=None):
    from services.trainer.jobs import JobResult, default_name
    from services.trainer.loop import FitResult
    from services.trainer.packaging import PublishTargets, stage_and_publish

    say = progress or (lambda stage, info: None)
    m = read_manifest(dataset_dir)
    L, n_vol = m["lookback"], m["horizons"][1]
    tnames = ["range@1", f"rvol@{n_vol}"]
    sp = {k: load_split(Path(dataset_dir), m, k) for k in ("train", "validation", "gate", "test")}
    say("start", dict(kind=m["kind"], samples={k: len(v) for k, v in sp.items()}, epochs=1, batches=1))
    tr, va, ga, te = sp["train"], sp["validation"], sp["gate"], sp["test"]
    ylog = {k: log_targets(v.y, v.last_close) for k, v in sp.items()}
    models = {"har": fit_har(tr.x, ylog["train"]), "ewma-opt": fit_ewma_opt(tr.x, ylog["train"], va.x, ylog["validation"])}
    # Selection on validation (the next-range MAE): the gate slice has not been looked at yet.
    val_mae = {k: float(np.mean(np.abs(mod.predict(va.x, va.last_close)[:, 0] - va.y[:, 0]))) for k, mod in models.items()}
    chosen_name = min(val_mae, key=val_mae.get)
    chosen = models[chosen_name]

    # Split-conformal 10/50/90 % quantiles of log(actual / forecast) on the gate slice, per target.
    log_res_gate = ylog["gate"] - chosen.predict_log(ga.x)
    chosen.quantiles = conformal_log_quantiles(log_res_gate)
    pers_gate = baselines(ga.hlc, n_vol)["persistence"]
    pers_q = conformal_log_quantiles(np.log(np.maximum(ga.y, 1e-12) / np.maximum(pers_gate, 1e-12)))

    say("evaluate", {})
    cards, verdicts, intervals = {}, {}, {}
    for split_name in ("validation", "gate", "test"):
        s = sp[split_name]
        preds = run_models(models, s, n_vol)
        cards[split_name] = scorecard(s, preds, tnames)
        cards[split_name] = {"model": cards[split_name][chosen_name], **cards[split_name]}
        if split_name == "validation":
            continue
        verdicts[split_name] = {}
        for mname in ("har", "ewma-opt"):
            for j, (t, h) in enumerate(zip(tnames, (1, n_vol))):
                for base in ("persistence", "ewma"):
                    verdicts[split_name][f"{mname}:{t}:{base}"] = paired_verdict(
                        preds[mname][:, j] - s.y[:, j], preds[base][:, j] - s.y[:, j], name=t, baseline=base, h=h)
        if split_name == "test":
            for j, t in enumerate(tnames):
                lvl = preds[chosen_name][:, j]
                band = lvl[:, None] * np.exp(chosen.quantiles[j][None, :])
                pb = preds["persistence"][:, j][:, None] * np.exp(pers_q[j][None, :])
                intervals[t] = dict(model=interval_report(s.y[:, j], band[:, 0], band[:, 2], lvl),
                                    persistence_empirical=interval_report(s.y[:, j], pb[:, 0], pb[:, 2], preds["persistence"][:, j]))

    def pick(split_name):
        return [verdicts[split_name][f"{chosen_name}:{t}:persistence"] for t in tnames]

    promoted, reason = gated_promotion(pick("gate"), pick("test"))
    reason = f"{chosen_name} (chosen on validation MAE {val_mae}): {reason}"

    work = Path(tempfile.mkdtemp(prefix="klinebus-range-"))
    try:
        say("export", {})
        onnx_path = export_onnx(chosen, L, work / "model.onnx")
        import onnxruntime as ort

        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        got_f, got_q = sess.run(None, {"features": te.hlc})
        want = chosen.predict(te.x, te.last_close)
        rel = float(np.max(np.abs(got_f - want) / np.maximum(np.abs(want), 1e-12)))
        if not np.isfinite(got_f).all() or rel > MAX_REL_DIFF:
            raise RuntimeError(f"onnxruntime differs from numpy by {rel:.3g} (relative)")
        check = dict(max_abs_diff=float(np.max(np.abs(got_f - want))), max_rel_diff=rel, samples=float(len(te)))

        r = m["ranges"]
        selection = TimeRange(start=r["validation"]["start"], end=r["gate"]["end"],
                              rows=r["validation"]["rows"] + r["gate"]["rows"])
        series = [(s["symbol"], s["interval"]) for s in m["series"]]
        test_card = cards["test"]
        meta = ModelPackage(
            name=options.name or default_name(m["kind"], series), version="1", kind=m["kind"],
            inputs=[TensorSpec(name="features", dtype="float64", shape=["batch", L, 3],
                               meaning=f"raw high, low, close of the last {L} closed candles, oldest first")],
            outputs=[TensorSpec(name="forecast", dtype="float64", shape=["batch", 2],
                                meaning=f"next candle's range (price units), realised volatility of the next {n_vol} candles (log-return units)"),
                     TensorSpec(name="quantiles", dtype="float64", shape=["batch", 2, 3],
                                meaning="10/50/90 % split-conformal quantiles of each forecast (80 % interval: columns 0 and 2)")],
            feature_set=SERVING_FEATURE_SET, features=list(COLUMNS), targets=["range", "rvol"], lookback=L,
            horizons=[1, n_vol], scalers={}, input_scaling="in-graph",
            serves=[Served(symbol=s, interval=i) for s, i in series],
            # "validation" here spans every slice the model was tuned or judged on (validation + gate),
            # so `klinebus evaluate` counts only later candles as unseen.
            ranges=Ranges(train=TimeRange(**r["train"]), validation=selection, test=TimeRange(**r["test"]), embargo=m["embargo"]),
            metrics=test_card["model"], baseline_metrics={k: v for k, v in test_card.items() if k not in ("model", chosen_name)},
            promoted=promoted, promotion_reason=reason, sha256="", code_version=code_version(),
            config=dict(model=chosen_name, params={k: v.params for k, v in models.items()},
                        validation_mae=val_mae, dm_alpha=DM_ALPHA,
                        intervals=dict(method="split-conformal", calibrated_on="gate", quantiles=list(INTERVAL_QUANTILES),
                                       space="log(actual / forecast)", columns=tnames,
                                       log_residual_quantiles=chosen.quantiles.tolist(),
                                       persistence_log_residual_quantiles=pers_q.tolist()),
                        dataset=dict(cuts=m["cuts"], ranges=m["ranges"], series=m["series"], spec=m["spec"],
                                     code_version=m["code_version"])),
            evaluation=dict(validation=cards["validation"], gate=cards["gate"], test=test_card, verdicts=verdicts,
                            intervals=intervals, export_check=check),
        )
        scorecards = dict(validation=cards["validation"], gate=cards["gate"], test=test_card, verdicts=verdicts,
                          intervals=intervals, chosen=chosen_name, reason=reason)
        say("publish", {})
        published, hub = stage_and_publish(
            meta, onnx_path, lambda meta: range_card(meta, scorecards),
            PublishTargets(options.registry, options.hub_repo_id, options.hub_token, options.hub_endpoint),
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    fit = FitResult(device="cpu", amp=False, best_epoch=1, best_val_loss=val_mae[chosen_name], epochs_run=1, stopped="closed-form")
    return JobResult(published, hub, fit, scorecards, check)


def _f(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.6g}"


def range_card(meta: ModelPackage, sc: dict) -> str:
    pairs = ", ".join(f"{s.symbol} {s.interval}" for s in meta.serves)
    front = {"library_name": "onnx", "pipeline_tag": "time-series-forecasting",
             "tags": ["klinebus", meta.kind, "onnx", "crypto", "volatility"], "license": "mit"}
    lines = ["---", json.dumps(front, indent=1), "---", "", f"# {meta.name} v{meta.version}", "",
             f"**Promoted: {'yes' if meta.promoted else 'no'}.** {meta.promotion_reason}", "",
             f"Kind `{meta.kind}` ({sc['chosen']}), trained by klinebus {meta.code_version}. Serves {pairs}.", "",
             "Promotion rule: on the gate slice (never fitted or tuned on) the model's MAE must be lower than "
             f"persistence's for both targets with a one-sided Diebold-Mariano test (HLN small-sample correction, "
             f"Bartlett HAC variance) at {meta.config['dm_alpha']:.0%}; on the later test slice it must not lose.", ""]
    for split in ("gate", "test"):
        lines += [f"## {split.capitalize()} slice: paired verdicts (absolute error)", "",
                  "| model | target | baseline | model MAE | baseline MAE | ratio | ratio 95 % CI | diff 95 % CI | DM-HLN | p |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for key, v in sc["verdicts"][split].items():
            mname = key.split(":")[0]
            lines.append(f"| {mname} | {v['metric']} | {v['baseline']} | {_f(v['model_mae'])} | {_f(v['baseline_mae'])} | "
                         f"{v['mae_ratio']:.3f} | {v['mae_ratio_ci_low']:.3f}-{v['mae_ratio_ci_high']:.3f} | "
                         f"{_f(v['mae_diff_ci_low'])} – {_f(v['mae_diff_ci_high'])} | {v['dm_statistic']:.2f} | {v['dm_p_value']:.3g} |")
        lines.append("")
    lines += ["## 80 % intervals on the test slice (calibrated on gate)", "",
              "| target | forecaster | coverage | 95 % CI | mean width / forecast |", "|---|---|---|---|---|"]
    for t, rep in sc["intervals"].items():
        for who, r in rep.items():
            lines.append(f"| {t} | {who} | {r['coverage']:.3f} | {r['coverage_ci_low']:.3f}-{r['coverage_ci_high']:.3f} | {r['mean_rel_width']:.3f} |")
    lines += ["", "## Data", ""]
    r = meta.config["dataset"]["ranges"]
    from services.trainer.sources import fmt_ms

    for k in ("train", "validation", "gate", "test"):
        lines.append(f"- {k}: {fmt_ms(r[k]['start'])} → {fmt_ms(r[k]['end'])} UTC, {r[k]['rows']} samples")
    lines += ["", "## Parameters", "", "```json", json.dumps(meta.config["params"], indent=1), "```", ""]
    return "\n".join(lines) + "\n"
