"""ORPO fine-tuning on the advice preference pairs, exported to GGUF for the scorecard.

Seed 003 fine-tuned Phi-3 with Unsloth's ORPO trainer for ~22 h on an RTX 4090, then converted
and quantised to Q8_0 with llama.cpp by hand. Here the same job is one command: TRL's
``ORPOTrainer`` (``trl.experimental.orpo`` since TRL 1.x) on ``orpo/train.parquet`` (prompt,
chosen and rejected turns, the model's own chat template), LoRA adapters by default (merged
into the weights at the end), then llama.cpp's ``convert_hf_to_gguf.py`` when a llama.cpp
checkout is given. The verify split is never read here: it is the scorecard's, and choosing a
checkpoint on it would be choosing on the test set.

It wants a CUDA GPU; on CPU it refuses unless ``--allow-cpu`` (tiny models in tests). What is
missing is said in one line. No quality claim comes out of this job: only the scorecard
(``klinebus evaluate advice --model OUT/model-q8_0.gguf --dataset DIR``) says how good it is.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from libs.common.errors import CliError
from services.trainer.advice import dataset as D

DEFAULT_BASE_MODEL = "microsoft/Phi-3-mini-4k-instruct"  # the seed's model
DEFAULT_EPOCHS = 1.0
DEFAULT_LEARNING_RATE = 8e-6  # the ORPO paper's and TRL's default
DEFAULT_BETA = 0.1  # the ORPO paper's lambda (TRL's default)
DEFAULT_BATCH_SIZE = 8
DEFAULT_LORA_RANK = 16
DEFAULT_MAX_LENGTH = 1024  # the seed's num_ctx
REQUIRED = {"trl": "trl==1.16.0", "peft": "peft==0.21.2", "datasets": "datasets==5.2.0", "accelerate": "accelerate==1.15.0"}
CONVERTER = "convert_hf_to_gguf.py"


@dataclass
class OrpoOptions:
    dataset: str
    out: str
    base_model: str = DEFAULT_BASE_MODEL
    epochs: float = DEFAULT_EPOCHS
    max_steps: int = -1
    learning_rate: float = DEFAULT_LEARNING_RATE
    beta: float = DEFAULT_BETA
    batch_size: int = DEFAULT_BATCH_SIZE
    lora_rank: int = DEFAULT_LORA_RANK
    max_length: int = DEFAULT_MAX_LENGTH
    device: str | None = None
    llama_cpp: str | None = None
    gguf_type: str = "q8_0"
    allow_cpu: bool = False
    seed: int = 3

    @classmethod
    def from_args(cls, args: Any) -> "OrpoOptions":
        names = cls.__dataclass_fields__
        values = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
        return cls(**{k: str(v) if k in ("dataset", "out") else v for k, v in values.items()})


def missing_packages() -> list[str]:
    return [pin for name, pin in REQUIRED.items() if importlib.util.find_spec(name) is None]


def resolve_device(requested: str | None, allow_cpu: bool) -> str:
    """``cuda`` when asked for or present; CPU only with ``allow_cpu``. One line otherwise."""
    import torch

    cuda = torch.cuda.is_available()
    if requested == "cuda" and not cuda:
        raise CliError("advice-orpo: --device cuda but torch sees no CUDA GPU (torch.cuda.is_available() is False)")
    device = requested or ("cuda" if cuda else "cpu")
    if device == "cpu" and not allow_cpu:
        raise CliError(
            "advice-orpo needs a CUDA GPU and torch sees none; a real model on CPU would take days "
            "(pass --allow-cpu for tiny models)"
        )
    return device


def find_converter(llama_cpp: str | None) -> Path | None:
    folder = llama_cpp or os.environ.get("LLAMA_CPP_DIR")
    if not folder:
        return None
    script = Path(folder) / CONVERTER
    if not script.is_file():
        raise CliError(f"{folder} has no {CONVERTER}; point --llama-cpp at a llama.cpp checkout")
    return script


def export_gguf(hf_dir: Path, out_file: Path, converter: Path, outtype: str) -> None:
    """llama.cpp's converter, written beside and renamed (no half file is ever the model)."""
    tmp = out_file.with_suffix(".gguf.tmp")
    cmd = [sys.executable, str(converter), str(hf_dir), "--outfile", str(tmp), "--outtype", outtype]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = " ".join((done.stderr or done.stdout).split())[-300:]
        tmp.unlink(missing_ok=True)
        raise CliError(f"GGUF export failed ({' '.join(cmd[1:3])} ...): {tail}")
    os.replace(tmp, out_file)


def run(opts: OrpoOptions) -> dict[str, Any]:
    missing = missing_packages()
    if missing:
        raise CliError(f"advice-orpo needs {', '.join(missing)}: pip install {' '.join(missing)}")
    device = resolve_device(opts.device, opts.allow_cpu)
    manifest = D.read_manifest(opts.dataset)
    pairs = Path(opts.dataset) / "orpo" / "train.parquet"
    if not pairs.exists():
        raise CliError(f"{pairs}: missing; rebuild the dataset")
    converter = find_converter(opts.llama_cpp)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(opts.base_model)
    if not tokenizer.chat_template:
        raise CliError(f"{opts.base_model} has no chat template; ORPO on chat turns needs one")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(opts.base_model, dtype=dtype)
    peft_config = None
    if opts.lora_rank > 0:
        from peft import LoraConfig

        peft_config = LoraConfig(r=opts.lora_rank, lora_alpha=2 * opts.lora_rank, lora_dropout=0.05,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    train = Dataset.from_parquet(str(pairs)).remove_columns(["id"])
    checkpoints = out / "checkpoints"
    config = ORPOConfig(
        output_dir=str(checkpoints),
        beta=opts.beta,
        learning_rate=opts.learning_rate,
        per_device_train_batch_size=opts.batch_size,
        num_train_epochs=opts.epochs,
        max_steps=opts.max_steps,
        max_length=opts.max_length,
        bf16=dtype == torch.bfloat16,
        use_cpu=device == "cpu",
        logging_steps=max(1, min(50, opts.max_steps if opts.max_steps > 0 else 50)),
        save_steps=500,
        save_total_limit=2,
        report_to=[],
        seed=opts.seed,
    )
    trainer = ORPOTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer, peft_config=peft_config)
    # A restarted job carries on from its newest checkpoint instead of starting over.
    resume = any(checkpoints.glob("checkpoint-*")) if checkpoints.exists() else False
    started = time.monotonic()
    outcome = trainer.train(resume_from_checkpoint=True if resume else None)
    seconds = time.monotonic() - started
    trained = trainer.model
    if peft_config is not None:
        trained = trained.merge_and_unload()
    hf_dir = out / "hf"
    tmp = out / "hf.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    trained.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(hf_dir, ignore_errors=True)
    os.replace(tmp, hf_dir)

    gguf = out / f"model-{opts.gguf_type}.gguf"
    if converter is not None:
        export_gguf(hf_dir, gguf, converter, opts.gguf_type)
        note = f"GGUF: {gguf}; score it: klinebus evaluate advice --model {gguf} --dataset {opts.dataset}"
    else:
        note = (f"GGUF export skipped: no llama.cpp converter (pass --llama-cpp DIR or set LLAMA_CPP_DIR); "
                f"the merged model is in {hf_dir}")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = {
        "kind": "advice-orpo",
        "out": str(out),
        "base_model": opts.base_model,
        "dataset": str(opts.dataset),
        "dataset_ranges": manifest["ranges"],
        "train_pairs": len(train),
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "options": asdict(opts),
        "steps": int(trainer.state.global_step),
        "train_loss": float(outcome.training_loss),
        "logged_losses": losses,
        "seconds": round(seconds, 1),
        "resumed_from_checkpoint": resume,
        "gguf": str(gguf) if converter is not None else None,
        "gguf_note": note,
        "quality": "none claimed: run the scorecard on the verify split",
    }
    (out / "klinebus-advice-orpo.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
