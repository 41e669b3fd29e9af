"""A training job: dataset folder in, published model package out. The command line (``klinebus
train``) and the service run the same function; the chart classifier registers its own.

Order: train (early stopping on validation) -> export ONNX -> check onnxruntime against torch on
real test windows -> score validation and test *with the exported graph* (what serving runs) beside
the baselines -> decide promotion on validation -> write, verify and publish the package.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from libs.common.contracts import ModelPublished
from libs.common.model_package import (
    ModelPackage,
    PublishedPackage,
    Ranges,
    Scaler,
    Served,
    TensorSpec,
    TimeRange,
    code_version,
)
from services.trainer.datasets import DatasetError, get_kind, read_manifest
from services.trainer.datasets.sequence import PRICE_NAMES, SequenceDataset, SplitArrays
from services.trainer.evaluation import forecast_scorecard, promotion, walk_forward
from services.trainer.export import check_onnx, export_onnx
from services.trainer.loop import EpochLog, FitResult, JobInterrupted, LoopConfig, fit
from services.trainer.models import SEED_CONFIGS, ServingGraph, WeightedMSE, build_core
from services.trainer.packaging import PublishTargets, model_card, stage_and_publish

Progress = Callable[[str, dict], None]
ONNX_BATCH = 1024
EXPORT_CHECK_SAMPLES = 64


@dataclass
class TrainOptions:
    registry: str
    epochs: int | None = None
    device: str = "auto"
    seed: int = 0
    max_batches: int | None = None
    patience: int | None = None
    batch_size: int | None = None
    name: str | None = None
    folds: int = 3
    hub_repo_id: str | None = None
    hub_token: str | None = None
    hub_endpoint: str | None = None
    should_stop: Callable[[], bool] | None = None
    threads: int | None = 1


@dataclass
class JobResult:
    published: PublishedPackage
    hub: PublishedPackage | None
    fit: FitResult
    scorecards: dict[str, Any]
    export_check: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)

    def event(self) -> ModelPublished:
        meta = self.published.meta
        return ModelPublished(
            model=meta.name,
            version=meta.version,
            uri=self.hub.uri if self.hub is not None else self.published.uri,
            sha256=self.published.sha256,
            feature_set=meta.feature_set,
            train_range=(meta.ranges.train.start, meta.ranges.train.end),
            eval_range=(meta.ranges.test.start, meta.ranges.test.end),
            metrics={k: v for k, v in meta.metrics.items() if math.isfinite(v)},
            baseline_metrics={b: {k: v for k, v in m.items() if math.isfinite(v)} for b, m in meta.baseline_metrics.items()},
            promoted=meta.promoted,
        )


def run_training(dataset_dir: str | Path, options: TrainOptions, progress: Progress | None = None):
    """Train whatever kind the dataset's manifest names."""
    manifest = read_manifest(dataset_dir)
    return get_kind(manifest["kind"]).train(dataset_dir, options, progress)


def default_name(kind: str, series: list[tuple[str, str]]) -> str:
    symbols = sorted({s for s, _ in series})
    intervals = sorted({i for _, i in series})
    if len(series) == 1:
        return f"{kind}-{symbols[0]}-{intervals[0]}"
    if len(symbols) == 1:
        return f"{kind}-{symbols[0]}-unified"
    if len(intervals) == 1:
        return f"{kind}-unified-{intervals[0]}"
    return f"{kind}-unified"


def _batches(split: SplitArrays, y: np.ndarray, lookback: int, batch_size: int, order: np.ndarray):
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        yield torch.from_numpy(split.features[split.window_index(idx, lookback)]), torch.from_numpy(y[idx])


def onnx_predict(path: Path, split: SplitArrays, lookback: int) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = []
    for i in range(0, len(split), ONNX_BATCH):
        idx = np.arange(i, min(i + ONNX_BATCH, len(split)))
        out.append(sess.run(None, {"features": split.raw_features[split.window_index(idx, lookback)]})[0])
    return np.concatenate(out)


def _actual(split: SplitArrays, targets: list[str]) -> np.ndarray:
    return split.future_prices[:, :, [PRICE_NAMES.index(t) for t in targets]]


def train_sequence(dataset_dir: str | Path, options: TrainOptions, progress: Progress | None = None) -> JobResult:
    say = progress or (lambda stage, info: None)
    ds = SequenceDataset(dataset_dir)
    m = ds.manifest
    kind = m["kind"]
    seed_cfg = SEED_CONFIGS[kind]
    L, H, T = ds.lookback, len(ds.horizons), len(ds.targets)
    if "close" not in ds.features:
        raise DatasetError(f"{dataset_dir}: the features lack 'close', which the graph decodes prices from")
    train, val, test = ds.split("train"), ds.split("validation"), ds.split("test")
    y_train, y_val = ds.scale_targets(train.targets), ds.scale_targets(val.targets)
    batch_size = options.batch_size or seed_cfg["batch_size"]
    cfg = LoopConfig(
        epochs=options.epochs or seed_cfg["epochs"], lr=seed_cfg["lr"], patience=options.patience or seed_cfg["patience"],
        lr_factor=seed_cfg["lr_factor"], lr_patience=seed_cfg["lr_patience"], seed=options.seed, device=options.device,
        max_batches=options.max_batches, threads=options.threads,
    )
    torch.manual_seed(cfg.seed)
    core = build_core(kind, len(ds.features), H, T)
    loss = WeightedMSE([seed_cfg["loss_weights"][t] for t in ds.targets])
    say("start", dict(kind=kind, samples={k: len(s) for k, s in (("train", train), ("validation", val), ("test", test))},
                      epochs=cfg.epochs, batches=math.ceil(len(train) / batch_size) if cfg.max_batches is None
                      else min(cfg.max_batches, math.ceil(len(train) / batch_size))))
    result = fit(
        core,
        train_batches=lambda rng: _batches(train, y_train, L, batch_size, rng.permutation(len(train))),
        val_batches=lambda: _batches(val, y_val, L, 1024, np.arange(len(val))),
        loss_fn=loss, config=cfg,
        on_epoch=lambda log: say("epoch", asdict(log)),
        on_batch=lambda epoch, b: say("batch", dict(epoch=epoch, batch=b)),
        should_stop=options.should_stop,
    )
    if result.stopped == "asked":
        raise JobInterrupted(f"stopped after {result.epochs_run} epochs, before training finished; nothing published")
    if not result.history or not math.isfinite(result.best_val_loss):
        raise RuntimeError(f"training produced no finite validation loss ({result.stopped}, {result.epochs_run} epochs)")

    graph = ServingGraph(core.cpu(), ds.x_scaler.center, ds.x_scaler.scale, ds.y_scaler.center, ds.y_scaler.scale,
                         ds.features.index("close"))
    work = Path(tempfile.mkdtemp(prefix="klinebus-train-"))
    try:
        say("export", {})
        onnx_path = work / "model.onnx"
        rng = np.random.default_rng(options.seed)
        sample_idx = np.sort(rng.choice(len(test), size=min(EXPORT_CHECK_SAMPLES, len(test)), replace=False))
        example = torch.from_numpy(test.raw_features[test.window_index(sample_idx[:2], L)])
        export_onnx(graph, (example,), onnx_path, ["features"], ["forecast"])
        check = check_onnx(graph, onnx_path, {"features": test.raw_features[test.window_index(sample_idx, L)]})

        say("evaluate", {})
        drift = np.asarray([m["drift"][f"{t}@{h}"] for h in ds.horizons for t in ds.targets]).reshape(H, T)
        moved = train.future_prices[:, 0, 3] != train.last_close
        up_share = float(np.mean(train.future_prices[moved, 0, 3] > train.last_close[moved])) if moved.any() else 0.5

        def card(split: SplitArrays, pred: np.ndarray, idx: np.ndarray | None = None) -> dict:
            if idx is not None:
                split, pred = split.subset(idx), pred[idx]
            return forecast_scorecard(pred, _actual(split, ds.targets), split.last_prices, ds.targets, ds.horizons, drift, up_share)

        val_pred, test_pred = onnx_predict(onnx_path, val, L), onnx_predict(onnx_path, test, L)
        val_card, test_card = card(val, val_pred), card(test, test_pred)
        folds = walk_forward(test.anchor_time, options.folds, lambda idx: card(test, test_pred, idx))
        also = [f"close@{ds.horizons[0]}_mae"] if "close" in ds.targets and len(ds.targets) > 1 else []
        promoted, reason = promotion(val_card, split="validation", also=also)
        test_verdict = promotion(test_card, split="test", also=also)[1].replace("; promoted", "").replace("; stored, not promoted", "")
        reason = f"{reason}. On the later test slice: {test_verdict}."

        r = m["ranges"]
        meta = ModelPackage(
            name=options.name or default_name(kind, ds.series),
            version="1",
            kind=kind,
            inputs=[TensorSpec(name="features", dtype="float64", shape=["batch", L, len(ds.features)],
                               meaning=f"raw {m['feature_set']} values of the last {L} closed candles, oldest first "
                                       "(the graph scales them itself)")],
            outputs=[TensorSpec(name="forecast", dtype="float64", shape=["batch", H, T],
                                meaning=f"forecast prices; axis 1: horizons {ds.horizons}, axis 2: {ds.targets}")],
            feature_set=m["feature_set"],
            features=ds.features,
            skipped_features=m["skipped_features"],
            targets=ds.targets,
            lookback=L,
            horizons=ds.horizons,
            scalers={"inputs": ds.x_scaler, "targets": ds.y_scaler},
            input_scaling="in-graph",
            serves=[Served(symbol=s, interval=i) for s, i in ds.series],
            ranges=Ranges(train=TimeRange(**r["train"]), validation=TimeRange(**r["validation"]),
                          test=TimeRange(**r["test"]), embargo=m["embargo"]),
            metrics=test_card["model"],
            baseline_metrics={k: v for k, v in test_card.items() if k != "model"},
            promoted=promoted,
            promotion_reason=reason,
            sha256="",
            code_version=code_version(),
            config=dict(
                loop=cfg.as_dict(), batch_size=batch_size, loss_weights=seed_cfg["loss_weights"], model=seed_cfg["model"],
                target_transform=m["target_transform"], train_up_share=up_share, dataset=dict(manifest_cuts=m["cuts"], series=m["series"],
                                                                     spec=m["spec"], code_version=m["code_version"]),
                fit=dict(device=result.device, amp=result.amp, best_epoch=result.best_epoch,
                         best_val_loss=result.best_val_loss, epochs_run=result.epochs_run, stopped=result.stopped,
                         train_samples_per_s=result.train_samples_per_s),
            ),
            evaluation=dict(validation=val_card, test=test_card, folds=folds, export_check=check),
        )
        scorecards = dict(validation=val_card, test=test_card, folds=folds)
        if options.should_stop is not None and options.should_stop():
            # Stopped after training (during evaluation or export): a stopped job publishes nothing;
            # the request stays pending and a restart runs it whole.
            raise JobInterrupted("stopped before publishing; nothing published")
        say("publish", {})
        published, hub = stage_and_publish(
            meta, onnx_path, lambda meta: model_card(meta, scorecards),
            PublishTargets(options.registry, options.hub_repo_id, options.hub_token, options.hub_endpoint),
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return JobResult(published, hub, result, scorecards, check)


def epoch_line(log: EpochLog) -> str:
    return (f"epoch {log.epoch}: train {log.train_loss:.5f} val {log.val_loss:.5f} lr {log.lr:.2g} "
            f"{log.samples / log.seconds if log.seconds else 0:.0f} samples/s{' *' if log.best else ''}")


__all__ = ["JobResult", "TrainOptions", "run_training", "train_sequence", "Scaler"]
