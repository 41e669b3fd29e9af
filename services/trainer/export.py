"""ONNX export: one self-contained file (weights inside), dynamic batch, pinned opset, checked
against torch eager on real samples with onnxruntime before anything is packaged.

A recurrent graph (LSTM nodes) also gets a fast serving variant beside it
(``model.int8.onnx``, ``libs.common.model_package.FAST_MODEL_FILE``): the float graph with its
constants folded, then onnxruntime's dynamic int8 quantisation of the recurrent weights
(``DynamicQuantizeLSTM``, per output channel; activations quantised per call). ``check_onnx``
runs it on the same real samples as the float file and keeps it only close to the float graph
(``FAST_MAX_MOVE_DIFF``, ``FAST_MAX_REL_DIFF``); the package writer copies a kept one into the package (hashed by the
manifest, named in ``config.fast_model``) and serving prefers it (docs/inference.md, "Fast path").
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings
from pathlib import Path

import numpy as np
import torch

OPSET = 18
# Largest relative difference (|onnx - torch| / max(|torch|, 1)) accepted between the exported graph
# and torch eager on the same samples; float32 LSTM kernels differ in summation order, not more.
MAX_REL_DIFF = 1e-4
FAST_MODEL_FILE = "model.int8.onnx"  # the same name as libs.common.model_package.FAST_MODEL_FILE
RECURRENT_OPS = frozenset({"LSTM"})  # what onnxruntime quantises dynamically (DynamicQuantizeLSTM)
# The int8 variant is kept when, on the check's real samples, its mean difference from the float
# graph is at most this share of the float forecast's mean move from the window's last close (for
# a graph without a known close: of the float output's mean magnitude), and no single answer
# differs by more than FAST_MAX_REL_DIFF of the float one. On the seed BiLSTM trained on BTCUSDT
# 15m: ~0.5 % of the move, 2e-5 of the price at most (docs/inference.md, "Fast path").
FAST_MAX_MOVE_DIFF = 0.05
FAST_MAX_REL_DIFF = 1e-3


class ExportError(RuntimeError):
    pass


def export_onnx(
    module: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    path: str | Path,
    input_names: list[str],
    output_names: list[str],
    fast: bool | None = None,
) -> Path:
    """Export ``module`` (eval mode, CPU) with the batch axis of every input dynamic.

    ``fast``: also write the int8 serving variant beside it (``FAST_MODEL_FILE``); ``None`` (the
    default) does so for recurrent graphs, where it pays (the seed BiLSTM ran ~1.8x faster)."""
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
    fast_path = path.with_name(FAST_MODEL_FILE)
    fast_path.unlink(missing_ok=True)
    if fast is None:
        fast = is_recurrent(path)
    if fast:
        try:
            quantize_onnx(path, fast_path)
        except ExportError as exc:  # the float graph serves alone; the check's report has no fast_* keys
            fast_path.unlink(missing_ok=True)
            logging.getLogger("klinebus.trainer").warning("no fast serving variant: %s", exc)
    return path


def is_recurrent(path: str | Path) -> bool:
    import onnx

    return any(n.op_type in RECURRENT_OPS for n in onnx.load(str(path), load_external_data=False).graph.node)


def quantize_onnx(src: str | Path, dst: str | Path) -> Path:
    """The int8 serving variant of a float graph: constants folded by onnxruntime's basic graph
    optimisations (the exporter builds the LSTM weights from the torch parameters with Slice/Concat
    nodes, which the quantiser cannot see through), the exporter's stale shape annotations dropped,
    then the recurrent nodes' weights quantised to int8 per output channel (``DynamicQuantizeLSTM``;
    the dense layers stay float: they are a few percent of the time)."""
    import tempfile

    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = Path(dst)
    with tempfile.TemporaryDirectory(prefix="klinebus-quantize-") as tmp:
        folded = Path(tmp) / "folded.onnx"
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # portable ops only
        opts.optimized_model_filepath = str(folded)
        ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
        model = onnx.load(str(folded))
        del model.graph.value_info[:]
        onnx.save(model, str(folded))
        sink = io.StringIO()
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            level = logging.getLogger().level
            logging.getLogger().setLevel(logging.ERROR)  # the quantiser logs "consider pre-processing" on root
            try:
                quantize_dynamic(str(folded), str(dst), op_types_to_quantize=["LSTM"],
                                 per_channel=True, weight_type=QuantType.QInt8)
            except Exception as e:
                raise ExportError(f"int8 quantisation failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
            finally:
                logging.getLogger().setLevel(level)
    return dst


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
    fast = Path(path).with_name(FAST_MODEL_FILE)
    if fast.exists():
        report.update(check_fast(module, fast, samples, got))
    return report


def check_fast(module: torch.nn.Module, fast: Path, samples: dict[str, np.ndarray], float_out: np.ndarray) -> dict[str, float]:
    """The int8 variant against the float graph's answers on the same real samples; past
    ``FAST_MAX_MOVE_DIFF`` of the forecast's move (mean) or ``FAST_MAX_REL_DIFF`` (any one answer)
    the variant is deleted (the package then ships
    the float graph alone) and the report says so (``fast_kept`` 0)."""
    import onnxruntime as ort

    got = ort.InferenceSession(str(fast), providers=["CPUExecutionProvider"]).run(None, samples)[0].astype(np.float64)
    want = float_out.astype(np.float64)
    move = np.abs(want - _anchor(module, samples, want))
    scale = float(np.mean(move)) if np.mean(move) > 0 else 1.0
    diff = np.abs(got - want)
    report = {"fast_int8": 1.0, "fast_max_diff_vs_move": float(diff.max() / scale) if got.shape == want.shape else math.inf,
              "fast_mean_diff_vs_move": float(diff.mean() / scale) if got.shape == want.shape else math.inf,
              "fast_max_rel_diff": float((diff / np.maximum(np.abs(want), 1.0)).max()) if got.shape == want.shape else math.inf,
              "fast_bound_mean_vs_move": FAST_MAX_MOVE_DIFF, "fast_bound_rel": FAST_MAX_REL_DIFF}
    kept = (got.shape == want.shape and bool(np.isfinite(got).all()) and report["fast_mean_diff_vs_move"] <= FAST_MAX_MOVE_DIFF
            and report["fast_max_rel_diff"] <= FAST_MAX_REL_DIFF)
    report["fast_kept"] = 1.0 if kept else 0.0
    if not kept:
        fast.unlink()
    return report


def _anchor(module: torch.nn.Module, samples: dict[str, np.ndarray], out: np.ndarray) -> np.ndarray:
    """What a forecast moves from: the window's last close broadcast over the output for a serving
    graph that decodes prices from it (``close_index``), else zero (the output's own size)."""
    close = getattr(module, "close_index", None)
    x = next(iter(samples.values()))
    if isinstance(close, int) and x.ndim == 3 and out.ndim >= 2:
        return x[:, -1, close].astype(np.float64).reshape((len(x),) + (1,) * (out.ndim - 1))
    return np.zeros_like(out)
