"""The demo's models, made before the pipeline starts, from the demo's own archive.

* A forecaster: the trainer's ``lstm-close`` dataset over the archived history of the demo's
  symbols (one unified model, seed 004's shape), trained for a few epochs, exported to ONNX and
  published to the demo's registry exactly as ``klinebus dataset build`` and ``klinebus train``
  do. Its scorecard (validation and a later test slice, beside persistence) is printed; whether
  it is promoted is the trainer's rule, and the demo serves it either way, as ``role=shadow``
  when it did not beat persistence, so its live predictions and live scores can be watched.
* A vision-language model: a tiny random-weight Qwen2.5-VL GGUF pair written on the spot
  (libs/llm/testing), so the VLM service runs for real (image encoding, grammar-constrained JSON,
  validation) without downloading 5 GB of weights. Its analyses are well-formed and meaningless;
  production points ``KLINEBUS_MODEL_PATH``/``KLINEBUS_MMPROJ_PATH`` at Qwen2.5-VL-7B-Instruct.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from libs.common.errors import CliError

DEMO_MODEL_KIND = "lstm-close"


@dataclass
class DemoModels:
    registry: Path | None = None
    forecaster: str = ""
    vlm_model: Path | None = None
    vlm_mmproj: Path | None = None


def train_forecaster(
    archive_root: Path, data_dir: Path, symbols: list[str], interval: str, epochs: int, console: Console
) -> tuple[Path, str]:
    """Build the dataset from the archive, train, export, publish; returns (registry, model name)."""
    try:
        from services.trainer.datasets import BuildSpec, build_dataset
        from services.trainer.jobs import TrainOptions, run_training
    except ModuleNotFoundError as exc:
        raise CliError(f"the demo's model needs the package {exc.name!r}: pip install 'klinebus[trainer]'") from None

    registry = data_dir / "models"
    dataset = data_dir / "datasets" / f"{DEMO_MODEL_KIND}-{interval}"
    started = time.monotonic()
    console.print(f"[bold]training[/bold] {DEMO_MODEL_KIND} on the archived {interval} history of {', '.join(symbols)} ...")
    build_dataset(BuildSpec(kind=DEMO_MODEL_KIND, inputs=[str(archive_root)], out=dataset, symbols=symbols, intervals=[interval]))
    result = run_training(dataset, TrainOptions(registry=str(registry), epochs=epochs))
    meta = result.published.meta
    served = "promoted" if meta.promoted else "served as shadow: scored live, not the answer"
    console.print(f"  {meta.name} v{meta.version} in {time.monotonic() - started:.0f}s ({served})")
    console.print(f"  [dim]{meta.promotion_reason}[/dim]")
    return registry, meta.name


def write_vlm(data_dir: Path, console: Console) -> tuple[Path, Path]:
    try:
        from libs.llm.testing import write_tiny_qwen25vl
    except ModuleNotFoundError as exc:
        raise CliError(f"the demo's VLM needs the package {exc.name!r}: pip install 'klinebus[vlm]'") from None
    pair = write_tiny_qwen25vl(data_dir / "models" / "vlm")
    console.print(
        "[bold]vlm[/bold]: a tiny random-weight Qwen2.5-VL GGUF pair (real llama.cpp, real image encoding, "
        "grammar-bound JSON; its readings mean nothing: production runs Qwen2.5-VL-7B-Instruct)"
    )
    return pair.model, pair.mmproj
