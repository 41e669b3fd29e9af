"""The ``advice`` dataset kind in the trainer's registry (``klinebus dataset build --kind advice``).

Its options beyond the common ones travel in ``BuildSpec.extra``: ``train_range`` and
``verify_range`` (``START..END``), ``threshold``, ``seed``, ``overwrite``. Its model is not an
ONNX package: an advice dataset is scored with ``klinebus evaluate advice`` and fine-tuned with
the ORPO job (``orpo.py``), so the kind's ``train`` says so in one line.
"""

from __future__ import annotations

from pathlib import Path

from libs.common.errors import CliError
from services.trainer.advice import dataset as D
from services.trainer.advice.cli import build
from services.trainer.datasets import BuildSpec, DatasetError, DatasetKind, register_kind


def build_advice(spec: BuildSpec) -> dict:
    if spec.intervals and list(spec.intervals) != [D.INTERVAL]:
        raise DatasetError(f"the advice dataset reads 1m candles, not {', '.join(spec.intervals)}")
    extra = spec.extra or {}
    try:
        threshold = float(extra.get("threshold", D.DEFAULT_THRESHOLD))
        seed = int(extra.get("seed", D.DEFAULT_SEED))
    except (TypeError, ValueError):
        raise DatasetError(f"advice: threshold must be a number and seed an integer, got {extra}") from None
    try:
        return build(
            spec.inputs, str(spec.out), spec.symbols, spec.lookback,
            extra.get("train_range"), extra.get("verify_range"), threshold, seed, extra.get("overwrite") is True,
        )
    except CliError as exc:
        raise DatasetError(str(exc)) from None


def train_advice(dataset_dir: str | Path, *_args, **_kwargs):
    raise DatasetError(
        f"{dataset_dir} is an advice dataset: score a GGUF model with `klinebus evaluate advice --model M.gguf "
        f"--dataset {dataset_dir}`, fine-tune with `klinebus train --kind advice-orpo --dataset {dataset_dir} ...` "
        "(ORPO, GPU; docs/advice.md)"
    )


KIND = register_kind(
    DatasetKind(
        name=D.KIND,
        description="seed 003: minute-level BUY/SELL/NOOP preference pairs from 1m candles (ORPO, GGUF scorecard)",
        build=build_advice,
        train=train_advice,
    )
)
