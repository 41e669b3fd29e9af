"""The persistence baseline as a real ONNX model: next close = last close.

It is the model every trained model must beat (DESIGN invariant 7), and until
trained models land it is what the inference service serves. Building it as an
ONNX graph means the skeleton runs the same path real models will: a registry
folder, onnxruntime, batched inputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PERSISTENCE = "persistence"
PERSISTENCE_VERSION = "1"
INPUT_NAME = "close_window"
OUTPUT_NAME = "next_close"
WINDOW = 1


def build_persistence_onnx() -> bytes:
    """A graph mapping ``close_window[batch, T]`` to ``next_close[batch, 1]`` = the last column."""
    import onnx
    from onnx import TensorProto, helper

    inp = helper.make_tensor_value_info(INPUT_NAME, TensorProto.DOUBLE, ["batch", "window"])
    out = helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.DOUBLE, ["batch", 1])
    consts = [
        helper.make_node("Constant", [], ["starts"], value=helper.make_tensor("s", TensorProto.INT64, [1], [-1])),
        helper.make_node(
            "Constant", [], ["ends"], value=helper.make_tensor("e", TensorProto.INT64, [1], [np.iinfo(np.int64).max])
        ),
        helper.make_node("Constant", [], ["axes"], value=helper.make_tensor("a", TensorProto.INT64, [1], [1])),
    ]
    last = helper.make_node("Slice", [INPUT_NAME, "starts", "ends", "axes"], [OUTPUT_NAME])
    graph = helper.make_graph(consts + [last], "persistence", [inp], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="klinebus")
    model.ir_version = 8  # readable by every onnxruntime we support
    onnx.checker.check_model(model)
    return model.SerializeToString()


def ensure_persistence_model(model_dir: Path) -> Path:
    """Write the baseline into the local registry (``<model_dir>/persistence/1/model.onnx``) once."""
    path = Path(model_dir) / PERSISTENCE / PERSISTENCE_VERSION / "model.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".onnx.tmp")
        tmp.write_bytes(build_persistence_onnx())
        tmp.replace(path)
    return path


def persistence_spec(path: Path):
    """The baseline's serving view: reads the close only, serves every (symbol, interval)."""
    from services.inference.package import PRICES, ModelSpec, Output

    return ModelSpec(
        name=PERSISTENCE,
        version=PERSISTENCE_VERSION,
        kind="persistence",
        feature_set="",
        features=("close",),
        lookback=WINDOW,
        input_name=INPUT_NAME,
        input_dtype="float64",
        input_rank=2,
        outputs=(Output(OUTPUT_NAME, PRICES, (("close", 1),)),),
        horizons=(1,),
        pairs=None,
        scaler=None,
        sha256="",
        promoted=True,
        path=Path(path),
    )
