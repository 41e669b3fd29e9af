"""What a user or a broken file can get wrong: each is one clear line."""

from __future__ import annotations

import io
import shutil

import pytest
import torch
from PIL import Image

from services.trainer.classifier.data import ChartImageError, ChartTextDataset, load_chart
from services.trainer.classifier.dataset import load_index
from services.trainer.classifier.export import ExportError, check_fusion, export_fusion
from services.trainer.classifier.model import FusionConfig, ModelError, build_fusion
from services.trainer.classifier.pipeline import ClassifierOptions, load_tokenizer, train_chart_classifier

from .conftest import minilm_dir, tiny_text, tiny_vision


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_corrupt_or_wrongly_sized_chart_is_refused_with_its_reason(tmp_path):
    assert load_chart(_png(224, 224)).shape == (224, 224, 3)
    with pytest.raises(ChartImageError, match="not a readable image"):
        load_chart(_png(224, 224)[:60])
    with pytest.raises(ChartImageError, match="1000x750 px, the model takes 224x224"):
        load_chart(_png(1000, 750))
    with pytest.raises(ChartImageError, match="no such chart image"):
        load_chart(tmp_path / "missing.png")


def test_a_corrupt_chart_in_a_dataset_names_the_file(btc_dataset, tmp_path):
    ds_dir = tmp_path / "ds"
    shutil.copytree(btc_dataset, ds_dir)
    index = load_index(ds_dir)
    victim = ds_dir / index["image_path"][3]
    victim.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    ds = ChartTextDataset(ds_dir, index, load_tokenizer(str(minilm_dir())), scale=0.01)
    assert ds[2]["image"].shape == (224, 224, 3)
    with pytest.raises(ChartImageError, match=victim.name):
        ds[3]


def test_a_missing_tokenizer_stops_training_before_anything_runs(btc_dataset, tmp_path):
    opts = ClassifierOptions(registry=str(tmp_path / "reg"), vision=tiny_vision(), text=tiny_text(64),
                             tokenizer=str(tmp_path / "no-tokenizer"))
    with pytest.raises(ModelError, match="cannot load the tokenizer") as info:
        train_chart_classifier(btc_dataset, opts)
    assert "\n" not in str(info.value)
    opts.tokenizer = None
    with pytest.raises(ModelError, match="needs --tokenizer"):
        train_chart_classifier(btc_dataset, opts)
    assert not (tmp_path / "reg").exists()


def test_an_onnx_file_that_disagrees_with_torch_is_refused(tmp_path):
    torch.manual_seed(0)
    a = build_fusion(FusionConfig(vision=tiny_vision(), text=tiny_text(64))).eval()
    b = build_fusion(FusionConfig(vision=tiny_vision(), text=tiny_text(64))).eval()  # other random weights
    sample = {"image": torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8),
              "input_ids": torch.randint(1, 64, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    path = export_fusion(a, sample, tmp_path / "a.onnx")
    report = check_fusion(a, path, sample)
    assert report["max_abs_diff_probabilities"] <= 1e-4 and report["max_abs_diff_next_close_scaled"] <= 1e-4
    with pytest.raises(ExportError, match="differs from torch"):
        check_fusion(b, path, sample)
    # the batch is dynamic: one chart and five charts go through the same file
    for n in (1, 5):
        s = {k: v[:1].repeat(n, *([1] * (v.dim() - 1))) for k, v in sample.items()}
        check_fusion(a, path, s)
