"""ONNX export: one self-contained file (weights inside), dynamic batch, pinned opset, checked
against torch eager on real samples with onnxruntime before anything is packaged."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

OPSET = 18
# Largest relative difference (|onnx - torch| / max(|torch|, 1)) accepted between the exported graph
# and torch eager on the same samples; float32 LSTM kernels differ in summation order, not more.
MAX_REL_DIFF = 1e-4


class ExportError(RuntimeError):
    pass


def export_onnx(
    module: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    path: str | Path,
    input_names: list[str],
    output_names: list[str],
) -> Path:
    """Export ``module`` (eval mode, CPU) with the batch axis of every input dynamic."""
    path = Path(path)
    module = module.to("cpu").eval()
    example = tuple(t.to("cpu") for t in example)
    batch = torch.export.Dim("batch", min=1)
    dynamic = {name: {0: batch} for name in input_names}
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        logging.getLogger("torch").setLevel(logging.ERROR)
        try:
            torch.onnx.export(
                module, example, str(path), input_names=input_names, output_names=output_names,
                dynamic_shapes=dynamic, opset_version=OPSET, dynamo=True, external_data=False, verbose=False,
            )
        except Exception as e:
            raise ExportError(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    return path


def check_onnx(module: torch.nn.Module, path: str | Path, samples: dict[str, np.ndarray]) -> dict[str, float]:
    """Run the file with onnxruntime and torch eager on the same real samples; raise past the bound."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, samples)[0]
    module = module.to("cpu").eval()
    with torch.no_grad():
        want = module(*(torch.from_numpy(v) for v in samples.values())).numpy()
    if got.shape != want.shape:
        raise ExportError(f"onnxruntime answered shape {got.shape}, torch {want.shape}")
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    rel = diff / np.maximum(np.abs(want), 1.0)
    report = {"max_abs_diff": float(diff.max()), "max_rel_diff": float(rel.max()), "samples": float(len(want)),
              "opset": float(OPSET)}
    if not np.isfinite(got).all() or report["max_rel_diff"] > MAX_REL_DIFF:
        raise ExportError(
            f"onnxruntime differs from torch by {report['max_rel_diff']:.3g} (relative), more than {MAX_REL_DIFF:g}"
        )
    return report
