"""A ``datasets.v1`` build request as a job: build (or reuse) the dataset, then train, evaluate,
export and publish. Plain code, no bus: the service runs it in a worker thread.

The dataset lands in ``<work_dir>/<request_id>`` (written beside and renamed, so a folder with a
manifest is complete and a restarted job reuses it). A request the data cannot meet raises
``ImpossibleRequest`` with one line; the service dead-letters it.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Callable

from libs.common.contracts import DatasetBuildRequest
from libs.indicators.feature_sets import FEATURE_SETS
from services.trainer.datasets import MANIFEST_FILE, BuildSpec, DatasetError, build_dataset, get_kind, read_manifest
from services.trainer.jobs import JobResult, TrainOptions, run_training
from services.trainer.settings import TrainerSettings
from services.trainer.sources import SourceError

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ImpossibleRequest(ValueError):
    """The request can never succeed as asked (unknown kind or feature set, no data, too little history)."""


def dataset_dir(settings: TrainerSettings, request_id: str) -> Path:
    if not _SAFE_ID.match(request_id):
        raise ImpossibleRequest(f"request_id {request_id!r} must match {_SAFE_ID.pattern}")
    return Path(settings.work_root()) / request_id


def spec_for(req: DatasetBuildRequest, settings: TrainerSettings) -> BuildSpec:
    if req.end < req.start:
        raise ImpossibleRequest(f"end {req.end} is before start {req.start}")
    try:
        kind = get_kind(req.model_kind)
    except DatasetError as e:
        raise ImpossibleRequest(str(e)) from None
    # An empty or unknown feature set falls back to the kind's only if empty; a wrong one is refused.
    feature_set = req.feature_set or kind.default_feature_set
    if req.model_kind in ("bilstm-ohlc", "lstm-close") and feature_set not in FEATURE_SETS:
        raise ImpossibleRequest(f"unknown feature set {feature_set!r}; known: {', '.join(FEATURE_SETS)}")
    return BuildSpec(
        kind=req.model_kind, inputs=[settings.archive_root()], out=dataset_dir(settings, req.request_id),
        symbols=[s.upper() for s in req.symbols], intervals=list(req.intervals), start=req.start, end=req.end,
        feature_set=feature_set, horizon=req.horizon,
    )


def run_request(
    req: DatasetBuildRequest,
    settings: TrainerSettings,
    progress: Callable[[str, dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> JobResult:
    say = progress or (lambda stage, info: None)
    spec = spec_for(req, settings)
    if spec.out.exists() and not (spec.out / MANIFEST_FILE).exists():
        shutil.rmtree(spec.out)  # not a finished dataset (cannot happen with rename, but never trust a folder)
    if spec.out.exists():
        read_manifest(spec.out)
        say("dataset", {"reused": str(spec.out)})
    else:
        say("dataset", {"building": str(spec.out)})
        try:
            build_dataset(spec)
        except (DatasetError, SourceError) as e:
            raise ImpossibleRequest(str(e)) from None
    options = TrainOptions(
        registry=settings.registry_root(), epochs=settings.max_epochs or None, device=settings.device,
        max_batches=settings.max_batches_per_epoch or None, threads=settings.torch_threads or None,
        seed=settings.seed, folds=settings.walk_forward_folds, hub_repo_id=settings.hf_repo_id or None,
        hub_token=settings.hf_token or None, hub_endpoint=settings.hf_endpoint or None, should_stop=should_stop,
    )
    return run_training(spec.out, options, progress)
