"""The model package format: write, read, verify, the registry (local and fsspec) and the Hub upload plan."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from libs.common import model_package as mp

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402


def _tiny_onnx(path: Path, scale: float = 2.0) -> Path:
    """y[batch, 1] = scale * x[batch, 3] summed: a real ONNX graph with its weight inside."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [3, 1], [scale] * 3)
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph(
        [node], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, path)
    return path


def _meta(**over) -> mp.ModelPackage:
    fields = dict(
        name="tiny-BTCUSDT-1h",
        version="1",
        kind="lstm-close",
        inputs=[mp.TensorSpec(name="x", dtype="float32", shape=["batch", 3])],
        outputs=[mp.TensorSpec(name="y", dtype="float32", shape=["batch", 1], meaning="scaled close t+1")],
        feature_set="test-3",
        features=["a", "b", "c"],
        targets=["close"],
        lookback=1,
        horizons=[1],
        scalers={"inputs": mp.Scaler(kind="standard", columns=["a", "b", "c"], center=[0, 0, 0], scale=[1, 1, 1])},
        serves=[mp.Served(symbol="BTCUSDT", interval="1h")],
        ranges=mp.Ranges(
            train=mp.TimeRange(start=0, end=10, rows=11),
            validation=mp.TimeRange(start=20, end=30, rows=11),
            test=mp.TimeRange(start=40, end=50, rows=11),
            embargo=2,
        ),
        metrics={"mae": 1.0},
        baseline_metrics={"persistence": {"mae": 2.0}},
        promoted=True,
        promotion_reason="validation MAE 1.0 < persistence 2.0",
        sha256="",
        code_version="test",
    )
    fields.update(over)
    return mp.ModelPackage(**fields)


@pytest.fixture
def package(tmp_path: Path) -> Path:
    onnx_file = _tiny_onnx(tmp_path / "src.onnx")
    mp.write_package(tmp_path / "pkg", _meta(), onnx_file, "---\nlicense: mit\n---\n# tiny\n")
    return tmp_path / "pkg"


def test_write_read_verify_round_trip(package: Path):
    meta = mp.verify_package(package)
    assert meta.sha256 == mp.sha256_file(package / mp.MODEL_FILE)
    assert len(meta.sha256) == 64
    assert meta.features == ["a", "b", "c"]
    assert meta.serves_pair("BTCUSDT", "1h") and not meta.serves_pair("BTCUSDT", "15m")
    on_disk = json.loads((package / mp.META_FILE).read_text())
    assert on_disk["sha256"] == meta.sha256 and on_disk["format"] == mp.PACKAGE_FORMAT


def test_verify_refuses_a_changed_model(package: Path, tmp_path: Path):
    _tiny_onnx(package / mp.MODEL_FILE, scale=3.0)
    with pytest.raises(mp.PackageError, match="sha256"):
        mp.verify_package(package)


def test_verify_refuses_an_announced_hash_that_differs(package: Path):
    with pytest.raises(mp.PackageError, match="announced"):
        mp.verify_package(package, expected_sha256="0" * 64)


def test_verify_refuses_graph_names_that_differ(tmp_path: Path):
    onnx_file = _tiny_onnx(tmp_path / "src.onnx")
    meta = _meta(inputs=[mp.TensorSpec(name="window", dtype="float32", shape=["batch", 3])])
    mp.write_package(tmp_path / "pkg", meta, onnx_file, "card")
    with pytest.raises(mp.PackageError, match="graph inputs"):
        mp.verify_package(tmp_path / "pkg")


def test_verify_refuses_a_truncated_model(package: Path):
    data = (package / mp.MODEL_FILE).read_bytes()[:20]
    (package / mp.MODEL_FILE).write_bytes(data)
    meta = json.loads((package / mp.META_FILE).read_text())
    meta["sha256"] = mp.sha256_file(package / mp.MODEL_FILE)
    (package / mp.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(mp.PackageError, match="not a readable ONNX"):
        mp.verify_package(package)


def test_malformed_metadata_is_one_line(package: Path):
    meta = json.loads((package / mp.META_FILE).read_text())
    meta["version"] = "01"
    (package / mp.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(mp.PackageError, match="field version") as e:
        mp.read_package(package)
    assert "\n" not in str(e.value)
    (package / mp.META_FILE).write_text("{not json")
    with pytest.raises(mp.PackageError, match="not JSON"):
        mp.read_package(package)


def test_schema_refuses_impossible_values():
    with pytest.raises(ValueError, match="follow each other"):
        _meta(ranges=mp.Ranges(
            train=mp.TimeRange(start=0, end=30, rows=1),
            validation=mp.TimeRange(start=20, end=30, rows=1),
            test=mp.TimeRange(start=40, end=50, rows=1),
        ))
    with pytest.raises(ValueError, match="model name"):
        _meta(name="../escape")
    with pytest.raises(ValueError, match="same length"):
        mp.Scaler(kind="standard", columns=["a"], center=[0, 1], scale=[1])
    with pytest.raises(ValueError, match="horizons"):
        _meta(horizons=[2, 1])


@pytest.mark.parametrize("url_kind", ["local", "memory"])
def test_registry_versions_only_grow(package: Path, tmp_path: Path, url_kind: str):
    import uuid

    url = str(tmp_path / "registry") if url_kind == "local" else f"memory://reg-{uuid.uuid4().hex}"
    reg = mp.Registry(url)
    first = reg.publish(package)
    second = reg.publish(package)
    assert (first.version, second.version) == ("1", "2")
    assert reg.versions("tiny-BTCUSDT-1h") == ["1", "2"]
    assert reg.models() == ["tiny-BTCUSDT-1h"]
    assert reg.read("tiny-BTCUSDT-1h", "2").version == "2"
    assert reg.latest("tiny-BTCUSDT-1h") == "2"
    # a folder a crashed writer left under the next number is skipped, never reused
    reg.fs.makedirs(reg.path("tiny-BTCUSDT-1h", "3"), exist_ok=True)
    assert reg.versions("tiny-BTCUSDT-1h") == ["1", "2"]
    assert reg.publish(package).version == "4"
    assert reg.verify("tiny-BTCUSDT-1h", "4", expected_sha256=first.sha256).sha256 == first.sha256
    assert not [p for p in reg.fs.ls(reg.path("tiny-BTCUSDT-1h"), detail=False) if mp.STAGING_PREFIX in p]


def test_fetch_package_from_fsspec_url_verifies_and_caches(package: Path, tmp_path: Path):
    import uuid

    reg = mp.Registry(f"memory://reg-{uuid.uuid4().hex}")
    pub = reg.publish(package)
    assert pub.uri.startswith("memory://")
    local, meta = mp.fetch_package(pub.uri, pub.sha256, tmp_path / "cache")
    assert meta.version == pub.version
    assert mp.sha256_file(local / mp.MODEL_FILE) == pub.sha256
    import onnxruntime as ort

    sess = ort.InferenceSession(str(local / mp.MODEL_FILE), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": np.ones((4, 3), np.float32)})
    assert y.shape == (4, 1) and np.allclose(y, 6.0)
    with pytest.raises(mp.PackageError, match="announced"):
        mp.fetch_package(pub.uri, "f" * 64, tmp_path / "cache2")


def test_local_registry_uri_is_a_path_fetch_accepts(package: Path, tmp_path: Path):
    reg = mp.Registry(tmp_path / "registry")
    pub = reg.publish(package)
    assert Path(pub.uri) == tmp_path / "registry" / "tiny-BTCUSDT-1h" / "1"
    local, meta = mp.fetch_package(pub.uri, pub.sha256, tmp_path / "cache")
    assert local == Path(pub.uri) and meta.promoted


def test_hub_upload_plan(package: Path):
    hub = mp.HubPublisher("my-org/{model}", token="hf_test")
    plan = hub.plan(package)
    assert plan.repo_id == "my-org/tiny-BTCUSDT-1h"
    assert plan.tag == "v1"
    assert sorted(rel for rel, _ in plan.files) == sorted([mp.CARD_FILE, mp.META_FILE, mp.MODEL_FILE])
    with pytest.raises(mp.PackageError, match="repo id and a token"):
        mp.HubPublisher("my-org/x", token="")
