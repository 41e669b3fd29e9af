"""ONNX export of the fused model through the trainer's exporter (services/trainer/export.py), and
a check of every output against torch with onnxruntime.

Inputs: ``image`` uint8 (batch, 224, 224, 3) (the decoded PNG), ``input_ids`` and
``attention_mask`` int64 (batch, max_tokens), text padded to ``max_tokens`` as in training.
Outputs: ``probabilities`` float32 (batch, 3) (bearish, neutral, bullish) and
``next_close_scaled`` float32 (batch,) (labels.py has the inverse). The batch is dynamic.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from services.trainer.export import OPSET, ExportError, export_onnx

INPUTS = ("image", "input_ids", "attention_mask")
OUTPUTS = ("probabilities", "next_close_scaled")
# float32 through two transformers: differences of ~1e-7 are rounding; 1e-4 on a probability or
# a unit-variance target would be a real difference.
MAX_ABS_DIFF = 1e-4

__all__ = ["INPUTS", "OUTPUTS", "OPSET", "MAX_ABS_DIFF", "ExportError", "Serving", "export_fusion", "check_fusion",
           "onnx_predict"]


class Serving(nn.Module):
    """What the graph computes: softmax over the class logits, and the scaled next close."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image, input_ids, attention_mask):
        logits, forecast = self.model(image, input_ids, attention_mask)
        return torch.softmax(logits, dim=-1), forecast


def export_fusion(model: nn.Module, sample: dict[str, torch.Tensor], path: str | Path) -> Path:
    return export_onnx(Serving(model), tuple(sample[k] for k in INPUTS), path, list(INPUTS), list(OUTPUTS))


def check_fusion(model: nn.Module, path: str | Path, sample: dict[str, torch.Tensor]) -> dict[str, float]:
    """onnxruntime vs torch eager on ``sample``, every output; ``ExportError`` past ``MAX_ABS_DIFF``."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(list(OUTPUTS), {k: sample[k].cpu().numpy() for k in INPUTS})
    with torch.no_grad():
        want = Serving(model).to("cpu").eval()(*(sample[k].cpu() for k in INPUTS))
    report: dict[str, float] = {"samples": float(len(sample["image"])), "opset": float(OPSET), "bound": MAX_ABS_DIFF}
    rel = 0.0
    for name, g, w in zip(OUTPUTS, got, want):
        w = w.numpy().astype(np.float64)
        if g.shape != w.shape:
            raise ExportError(f"{path}: onnxruntime's {name} has shape {g.shape}, torch's {w.shape}")
        diff = np.abs(g.astype(np.float64) - w)
        report[f"max_abs_diff_{name}"] = float(diff.max())
        rel = max(rel, float((diff / np.maximum(np.abs(w), 1.0)).max()))
    worst = max(report[f"max_abs_diff_{n}"] for n in OUTPUTS)
    # the trainer's report keys (klinebus train prints them), over every output
    report["max_abs_diff"], report["max_rel_diff"] = worst, rel
    if not worst <= MAX_ABS_DIFF:
        raise ExportError(f"{path}: onnxruntime differs from torch by {worst:.3g} (> {MAX_ABS_DIFF})")
    return report


def onnx_predict(path: str | Path, ds, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The exported graph over a dataset, in order: probabilities (n, 3), scaled next close (n,)."""
    import onnxruntime as ort
    from torch.utils.data import DataLoader

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probs, fcs = [], []
    for b in DataLoader(ds, batch_size=batch_size, shuffle=False):
        p, f = sess.run(list(OUTPUTS), {k: b[k].numpy() for k in INPUTS})
        probs.append(p)
        fcs.append(f)
    if not probs:
        return np.zeros((0, 3), np.float32), np.zeros(0, np.float32)
    return np.concatenate(probs), np.concatenate(fcs)
