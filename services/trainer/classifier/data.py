"""Torch datasets over a chart-classifier dataset folder: decoded chart pixels, token ids, targets.

``load_chart`` is what serving must do with a ``charts.v1`` PNG as well: decode, RGB, check the
size (the model's patch grid is fixed at 224 x 224), hand over ``uint8`` (H, W, 3). Scaling to the
vision model's mean and std happens inside the model (and the ONNX graph).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from services.trainer.classifier.labels import scale_target

# Decoding, the size check and tokenisation are shared with serving (libs.charting.classifier_input).
from libs.charting.classifier_input import IMAGE_SIZE, MAX_TOKENS, ChartImageError, load_chart, tokenize  # noqa: E402,F401


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
