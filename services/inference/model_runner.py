"""Runs one ONNX model with onnxruntime on CPU; inputs are ``[batch, window]`` so callers may batch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class LoadedModel:
    name: str
    version: str
    path: Path
    window: int
    input_name: str
    output_name: str


class OnnxRunner:
    def __init__(self, model: LoadedModel, threads: int = 1) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        # Services run several per node; one intra-op thread each keeps them from fighting over cores.
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.model = model
        self.session = ort.InferenceSession(str(model.path), opts, providers=["CPUExecutionProvider"])

    def predict(self, windows: np.ndarray) -> np.ndarray:
        """``windows[batch, window]`` of closes -> ``[batch]`` forecasts."""
        if windows.ndim != 2 or windows.shape[1] < self.model.window:
            raise ValueError(f"{self.model.name} needs [batch, {self.model.window}] inputs, got {windows.shape}")
        (out,) = self.session.run([self.model.output_name], {self.model.input_name: windows.astype(np.float64)})
        return np.asarray(out).reshape(len(windows))
