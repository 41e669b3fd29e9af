"""Torch datasets over a chart-classifier dataset folder: decoded chart pixels, token ids, targets.

``load_chart`` is what serving must do with a ``charts.v1`` PNG as well: decode, RGB, check the
size (the model's patch grid is fixed at 224 x 224), hand over ``uint8`` (H, W, 3). Scaling to the
vision model's mean and std happens inside the model (and the ONNX graph).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from services.trainer.classifier.labels import scale_target

MAX_TOKENS = 64  # the seed's text is ~42 BERT word pieces; room for long volumes and prices
IMAGE_SIZE = 224


class ChartImageError(ValueError):
    """A chart that cannot be fed to the model (corrupt, wrong size); one line."""


def load_chart(source: str | Path | bytes, size: int = IMAGE_SIZE) -> np.ndarray:
    """A PNG (path or bytes) -> ``uint8`` (size, size, 3); ``ChartImageError`` if it cannot be."""
    from PIL import Image, UnidentifiedImageError

    where = "chart" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as im:
            im.load()
            rgb = im.convert("RGB")
    except FileNotFoundError:
        raise ChartImageError(f"{where}: no such chart image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ChartImageError(f"{where}: not a readable image ({type(exc).__name__})") from None
    if rgb.size != (size, size):
        raise ChartImageError(f"{where}: chart is {rgb.size[0]}x{rgb.size[1]} px, the model takes {size}x{size}")
    return np.asarray(rgb, dtype=np.uint8)


def tokenize(tokenizer, texts: list[str], max_length: int = MAX_TOKENS) -> dict[str, np.ndarray]:
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}


class ChartTextDataset(Dataset):
    """One split of the index: ``image`` uint8 (224, 224, 3), ``input_ids``, ``attention_mask``,
    ``label`` (0/1/2), ``target`` (next close as a scaled return)."""

    def __init__(self, root: str | Path, index: pd.DataFrame, tokenizer, scale: float, max_length: int = MAX_TOKENS) -> None:
        self.root = Path(root)
        self.index = index.reset_index(drop=True)
        tok = tokenize(tokenizer, self.index["text"].tolist(), max_length)
        self.input_ids = torch.tensor(tok["input_ids"])
        self.attention_mask = torch.tensor(tok["attention_mask"])
        self.labels = torch.tensor(self.index["label"].to_numpy(np.int64))
        close = self.index["close"].to_numpy(np.float64)
        self.targets = torch.tensor(scale_target(close, self.index["next_close"].to_numpy(np.float64), scale), dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image = load_chart(self.root / self.index.at[i, "image_path"])
        return {
            "image": torch.from_numpy(image.copy()),
            "input_ids": self.input_ids[i],
            "attention_mask": self.attention_mask[i],
            "label": self.labels[i],
            "target": self.targets[i],
        }
