"""The ORPO job: real TRL on a tiny Llama built here (CPU), the GPU path where CUDA exists, and
one-line refusals for what is missing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from libs.common.errors import CliError
from services.trainer.advice import dataset as D
from services.trainer.advice import orpo

from .conftest import BTC_1M
from .tiny_hf import write_tiny_llama


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("orpo") / "ds"
    D.build([BTC_1M], out, D.AdviceConfig(D.parse_range("2026-04-15T00:00..2026-04-15T01:30"),
                                          D.parse_range("2026-04-15T01:30..2026-04-15T02:00")))
    return out


@pytest.fixture(scope="module")
def tiny_base(pairs, tmp_path_factory) -> Path:
    train = pd.read_parquet(pairs / "train.parquet")
    return write_tiny_llama(tmp_path_factory.mktemp("base"), list(train["prompt"]) + list(train["accepted"]))


def test_no_gpu_is_one_line_unless_allowed(pairs, tmp_path):
    if _has_cuda():
        pytest.skip("this machine has a GPU")
    with pytest.raises(CliError, match="needs a CUDA GPU"):
        orpo.run(orpo.OrpoOptions(dataset=str(pairs), out=str(tmp_path / "o")))
    with pytest.raises(CliError, match="--device cuda but torch sees no CUDA GPU"):
        orpo.run(orpo.OrpoOptions(dataset=str(pairs), out=str(tmp_path / "o"), device="cuda"))
    assert not (tmp_path / "o").exists()


def test_missing_trainer_packages_are_named_with_their_pins(pairs, tmp_path, monkeypatch):
    real = orpo.importlib.util.find_spec
    monkeypatch.setattr(orpo.importlib.util, "find_spec", lambda name: None if name in ("trl", "peft") else real(name))
    with pytest.raises(CliError, match=r"needs trl==1\.16\.0, peft==0\.21\.2: pip install"):
        orpo.run(orpo.OrpoOptions(dataset=str(pairs), out=str(tmp_path / "o"), allow_cpu=True))


def test_a_llama_cpp_folder_without_the_converter_is_refused(tmp_path):
    with pytest.raises(CliError, match="no convert_hf_to_gguf.py"):
        orpo.find_converter(str(tmp_path))


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(next(folder.glob("*.safetensors"))))


def _train_and_check(pairs: Path, base: Path, out: Path, device: str | None) -> dict:
    result = orpo.run(orpo.OrpoOptions(dataset=str(pairs), out=str(out), base_model=str(base), max_steps=2,
                                       batch_size=2, lora_rank=4, learning_rate=1e-3, allow_cpu=True,
                                       device=device, max_length=512))
    assert result["steps"] == 2 and result["train_pairs"] == len(pd.read_parquet(pairs / "train.parquet"))
    assert result["train_loss"] > 0
    assert json.loads((out / "klinebus-advice-orpo.json").read_text())["steps"] == 2
    base_w, tuned_w = _weights(base), _weights(out / "hf")
    assert set(base_w) == set(tuned_w)  # LoRA merged away: a plain model again
    changed = [k for k in base_w if "q_proj" in k and not base_w[k].float().cpu().equal(tuned_w[k].float().cpu())]
    assert changed, "training moved no attention weight"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out / "hf")
    assert AutoTokenizer.from_pretrained(out / "hf").chat_template
    return result


@pytest.mark.slow
def test_orpo_trains_a_tiny_llama_on_cpu_and_merges_it(pairs, tiny_base, tmp_path):
    result = _train_and_check(pairs, tiny_base, tmp_path / "out", device="cpu")
    assert result["device"] == "cpu"
    if os.environ.get("LLAMA_CPP_DIR"):
        assert result["gguf"] and Path(result["gguf"]).exists()
    else:
        assert result["gguf"] is None and "GGUF export skipped" in result["gguf_note"]


@pytest.mark.gpu
@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU")
def test_orpo_on_the_gpu(pairs, tiny_base, tmp_path):
    result = _train_and_check(pairs, tiny_base, tmp_path / "out", device="cuda")
    assert result["device"] == "cuda"
