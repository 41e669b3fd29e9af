"""The chart classifier on the trainer's loop (services/trainer/loop.py: Adam, LR decay on a
plateau, early stopping with the best weights restored, device auto, mixed precision on CUDA).

The loop's contract is one output tensor and one target tensor per batch, so training sees the
model through ``Joined``: its two heads side by side, ``(batch, 4)`` = 3 class logits then the
scaled next close, against ``(batch, 2)`` = the class then the scaled next-close target;
``CombinedLoss`` splits them again (cross-entropy + ``FORECAST_LOSS_WEIGHT`` x Huber, model.py).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from services.trainer.classifier.model import HUBER_DELTA, ChartTextFusion

BATCH_KEYS = ("image", "input_ids", "attention_mask")
DEFAULT_BATCH_SIZE = 8  # seed 001
DEFAULT_LR = 2e-5  # seed 001: fine-tuning two pretrained encoders
# An image encoder with random weights (the default small ViT) barely moves at 2e-5 in a few
# epochs; 3e-4 is Adam's usual rate for a small transformer trained from scratch.
RANDOM_VISION_LR = 3e-4
DEFAULT_EPOCHS = 5  # seed 001
DEFAULT_PATIENCE = 2


class Joined(nn.Module):
    def __init__(self, model: ChartTextFusion) -> None:
        super().__init__()
        self.model = model

    def forward(self, image, input_ids, attention_mask):
        logits, forecast = self.model(image, input_ids, attention_mask)
        return torch.cat([logits, forecast.unsqueeze(-1).to(logits.dtype)], dim=-1)


class CombinedLoss(nn.Module):
    def __init__(self, forecast_weight: float) -> None:
        super().__init__()
        self.forecast_weight = forecast_weight
        self.ce = nn.CrossEntropyLoss()
        self.huber = nn.HuberLoss(delta=HUBER_DELTA)

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.ce(out[:, :3], target[:, 0].long()) + self.forecast_weight * self.huber(out[:, 3], target[:, 1])


def _batches(ds: Dataset, batch_size: int, order: np.ndarray | None = None) -> Iterator:
    view = ds if order is None else Subset(ds, order.tolist())
    for b in DataLoader(view, batch_size=batch_size, shuffle=False):
        yield tuple(b[k] for k in BATCH_KEYS), torch.stack([b["label"].float(), b["target"]], dim=1)


def batch_sources(train_ds: Dataset, val_ds: Dataset, batch_size: int):
    """``train_batches(rng)`` (shuffled by the loop's seeded generator) and ``val_batches()``."""
    return (lambda rng: _batches(train_ds, batch_size, rng.permutation(len(train_ds))),
            lambda: _batches(val_ds, batch_size))
