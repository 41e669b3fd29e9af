"""ONNX export of the fused model, checked against torch with onnxruntime.

Inputs: ``image`` uint8 (batch, 224, 224, 3) (the decoded PNG), ``input_ids`` and
``attention_mask`` int64 (batch, tokens). Outputs: ``probabilities`` float32 (batch, 3)
(bearish, neutral, bullish) and ``next_close_scaled`` float32 (batch,) (see labels.py for the
inverse). Batch and token count are dynamic; the opset is pinned.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

OPSET = 18
INPUTS = ("image", "input_ids", "attention_mask")
OUTPUTS = ("probabilities", "next_close_scaled")
# float32 through two transformers: differences of ~1e-6 are rounding; 1e-4 on a probability
# or a unit-variance target would be a real difference.
MAX_ABS_DIFF = 1e-4


class ExportError(RuntimeError):
    pass


class _Serving(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image, input_ids, attention_mask):
        logits, forecast = self.model(image, input_ids, attention_mask)
        return torch.softmax(logits, dim=-1), forecast


@dataclass(frozen=True)
class ExportCheck:
    max_abs_diff_probabilities: float
    max_abs_diff_next_close_scaled: float
    samples: int

    def to_json(self) -> dict:
        return {
            "max_abs_diff_probabilities": self.max_abs_diff_probabilities,
            "max_abs_diff_next_close_scaled": self.max_abs_diff_next_close_scaled,
            "samples": self.samples, "bound": MAX_ABS_DIFF,
        }


def export_onnx(model: nn.Module, sample: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write one self-contained ONNX file (weights inside) for ``model`` traced on ``sample``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    serving = _Serving(model).eval().cpu()
    args = tuple(sample[k].cpu() for k in INPUTS)
    batch = torch.export.Dim("batch", min=1, max=4096)
    tokens = torch.export.Dim("tokens", min=2, max=512)
    shapes = {"image": {0: batch}, "input_ids": {0: batch, 1: tokens}, "attention_mask": {0: batch, 1: tokens}}
    with torch.no_grad():
        program = torch.onnx.export(
            serving, args, input_names=list(INPUTS), output_names=list(OUTPUTS), opset_version=OPSET,
            dynamic_shapes=shapes, dynamo=True, external_data=False, verbose=False,
        )
    program.save(str(path), external_data=False)
    return path


def check_onnx(model: nn.Module, path: str | Path, sample: dict[str, torch.Tensor]) -> ExportCheck:
    """Run the file with onnxruntime on ``sample`` and compare with torch; raise past ``MAX_ABS_DIFF``."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {k: sample[k].cpu().numpy() for k in INPUTS}
    probs, fc = sess.run(list(OUTPUTS), feed)
    with torch.no_grad():
        tp, tf = _Serving(model).eval().cpu()(*(sample[k].cpu() for k in INPUTS))
    check = ExportCheck(
        float(np.abs(probs - tp.numpy()).max()), float(np.abs(fc - tf.numpy()).max()), int(feed["image"].shape[0])
    )
    worst = max(check.max_abs_diff_probabilities, check.max_abs_diff_next_close_scaled)
    if not worst <= MAX_ABS_DIFF:
        raise ExportError(f"{path}: onnxruntime differs from torch by {worst:.3g} (> {MAX_ABS_DIFF})")
    return check
