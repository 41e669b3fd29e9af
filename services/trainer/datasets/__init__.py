"""Dataset kinds: one registry that ``klinebus dataset build --kind``, ``klinebus train`` and the
trainer service all read.

A kind says how to build its dataset folder and how to train, evaluate and package a model from
it. Adding one (the chart classifier, say) is a module that calls ``register_kind`` and one line
in ``PLUGINS`` below; nothing else in the trainer changes::

    register_kind(DatasetKind(
        name="chart-classifier",
        description="...",
        build=build_chart_dataset,      # (BuildSpec) -> manifest dict, writes spec.out
        train=train_chart_classifier,   # (dataset_dir, TrainOptions, progress) -> JobResult
        default_feature_set="chart-analysis-v1",
    ))
"""

from __future__ import annotations

import contextlib
import importlib
import json
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    from services.trainer.jobs import JobResult

MANIFEST_FILE = "manifest.json"


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A dataset is written into a hidden sibling folder and renamed into place whole, so a reader
    never sees half a dataset and a failure leaves nothing behind."""
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

# Modules that register kinds when imported. Add yours here (one line).
PLUGINS: tuple[str, ...] = (
    "services.trainer.datasets.sequence",
    "services.trainer.classifier.kind",
    "services.trainer.advice.kind",
    "services.trainer.datasets.range",
)


class DatasetError(ValueError):
    """A dataset request that cannot be met (unknown kind, too little history, empty range): one line."""


@dataclass(frozen=True)
class BuildSpec:
    """What to build; the command line and ``datasets.v1`` requests both become one of these."""

    kind: str
    inputs: list[str]
    out: Path
    symbols: list[str] | None = None
    intervals: list[str] | None = None
    start: int | None = None
    end: int | None = None
    feature_set: str | None = None
    lookback: int | None = None
    horizon: int | None = None
    # Time split: fractions of all samples by anchor time, the rest is the test slice.
    train_fraction: float = 0.7
    validation_fraction: float = 0.15
    # Forecasting kinds add a gate slice between validation and test: promotion is decided on it
    # (never tuned on), the test slice only confirms. None: half of what train and validation leave.
    gate_fraction: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetKind:
    name: str
    description: str
    build: Callable[[BuildSpec], dict]
    train: Callable[..., "JobResult"]
    default_feature_set: str = ""


KINDS: dict[str, DatasetKind] = {}
_loaded = False


def register_kind(kind: DatasetKind) -> DatasetKind:
    if kind.name in KINDS and KINDS[kind.name] is not kind:
        raise ValueError(f"dataset kind {kind.name!r} is registered twice")
    KINDS[kind.name] = kind
    return kind


def _load_plugins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in PLUGINS:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name is None or not module.startswith(e.name):  # a plugin not written yet is fine
                raise


def kinds() -> dict[str, DatasetKind]:
    _load_plugins()
    return dict(KINDS)


def get_kind(name: str) -> DatasetKind:
    known = kinds()
    if name not in known:
        raise DatasetError(f"unknown dataset kind {name!r}; known: {', '.join(sorted(known))}")
    return known[name]


def split_fractions(spec: BuildSpec) -> tuple[float, float, float]:
    """Train, validation and gate fractions (test is the rest), checked."""
    rest = 1.0 - spec.train_fraction - spec.validation_fraction
    gate = rest / 2 if spec.gate_fraction is None else spec.gate_fraction
    if not (spec.train_fraction > 0 and spec.validation_fraction > 0 and gate > 0 and rest - gate > 0):
        raise DatasetError(f"fractions train {spec.train_fraction}, validation {spec.validation_fraction}, "
                           f"gate {gate} leave no test slice")
    return spec.train_fraction, spec.validation_fraction, gate


def time_cuts(anchor_times, fractions: tuple[float, ...]) -> list[int]:
    """Anchor times at which each slice after the first starts (cumulative ``fractions`` of all samples)."""
    import numpy as np

    ordered = np.sort(np.asarray(anchor_times))
    cuts, acc = [], 0.0
    for f in fractions:
        acc += f
        cuts.append(int(ordered[min(int(len(ordered) * acc), len(ordered) - 1)]))
    return cuts


def split_masks(first_in, last_out, cuts: list[int], names: tuple[str, ...]) -> dict:
    """Slice membership by time: a sample belongs to slice k when its first input candle is at or
    after cut k-1 and its last target candle before cut k, so no window or target spans a cut."""
    import numpy as np

    bounds = [None, *cuts, None]
    out = {}
    for k, name in enumerate(names):
        m = np.ones(len(first_in), dtype=bool)
        if bounds[k] is not None:
            m &= first_in >= bounds[k]
        if bounds[k + 1] is not None:
            m &= last_out < bounds[k + 1]
        out[name] = m
    return out


def build_dataset(spec: BuildSpec) -> dict:
    """Build ``spec.out`` (written beside and renamed: a crash leaves no half dataset); returns its manifest."""
    return get_kind(spec.kind).build(spec)


def read_manifest(dataset_dir: str | Path) -> dict:
    path = Path(dataset_dir) / MANIFEST_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{dataset_dir}: not a dataset (no {MANIFEST_FILE})") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not JSON ({e.msg})") from None
