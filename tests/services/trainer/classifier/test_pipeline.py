"""Train a tiny chart classifier on real candles, export it, package it, and judge the package the
way serving will run it: onnxruntime on the PNGs and the packaged tokenizer, nothing else."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from transformers import AutoTokenizer

from libs.common.model_package import verify_package
from services.trainer.classifier.dataset import load_index
from services.trainer.classifier.pipeline import ClassifierOptions, train_chart_classifier

from .conftest import minilm_dir, tiny_text, tiny_vision


@pytest.fixture(scope="module")
def trained(btc_dataset, tmp_path_factory):
    registry = tmp_path_factory.mktemp("registry")
    opts = ClassifierOptions(
        registry=str(registry), vision=tiny_vision(), text=tiny_text(30522), tokenizer=str(minilm_dir()),
        epochs=2, lr=1e-3, batch_size=8, seed=0,
    )
    return train_chart_classifier(btc_dataset, opts)


def _serve(pkg, index):
    """What inference does with a package: PNG -> RGB uint8, text -> packaged tokenizer, run the graph."""
    meta = json.loads((pkg / "klinebus.json").read_text())
    tok = AutoTokenizer.from_pretrained(pkg / "tokenizer")
    n_tok = meta["inputs"][1]["shape"][1]
    enc = tok(index["text"].tolist(), padding="max_length", truncation=True, max_length=n_tok, return_tensors="np")
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in index["path"]])
    sess = ort.InferenceSession(str(pkg / "model.onnx"), providers=["CPUExecutionProvider"])
    probs, scaled = sess.run(None, {"image": images, "input_ids": enc["input_ids"].astype(np.int64),
                                    "attention_mask": enc["attention_mask"].astype(np.int64)})
    scale = meta["scalers"]["next_close"]["scale"][0]
    return probs, index["close"].to_numpy() * (1 + scaled.astype(np.float64) * scale), meta


def test_the_package_is_complete_and_verifies(trained):
    pkg = trained.package
    assert pkg.name == "chart-classifier-BTCUSDT-15m" and pkg.version == "1"
    meta = verify_package(pkg.uri, pkg.sha256)
    assert [(t.name, t.dtype) for t in meta.inputs] == [("image", "uint8"), ("input_ids", "int64"), ("attention_mask", "int64")]
    assert [t.name for t in meta.outputs] == ["probabilities", "next_close_scaled"]
    assert meta.kind == "chart-classifier" and meta.lookback == 10 and meta.serves_pair("BTCUSDT", "15m")
    assert meta.ranges.train.end < meta.ranges.validation.start < meta.ranges.test.start
    assert meta.config["training"]["epochs_run"] >= 1 and "hub_token" not in meta.config["training"]
    tok = AutoTokenizer.from_pretrained(f"{pkg.uri}/tokenizer")
    ref = AutoTokenizer.from_pretrained(minilm_dir())
    text = "Open: 29233.20, High: 29320.00, Low: 29215.93, Close: 29290.03, Volume: 785"
    assert tok(text)["input_ids"] == ref(text)["input_ids"]
    assert trained.export_check["max_abs_diff_probabilities"] <= 1e-4


def test_serving_the_package_reproduces_its_test_scorecard(trained, btc_dataset):
    from pathlib import Path

    index = load_index(btc_dataset)
    test = index[index.split == "test"].reset_index(drop=True)
    test["path"] = [btc_dataset / p for p in test["image_path"]]
    probs, next_close, meta = _serve(Path(trained.package.uri), test)
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    accuracy = float((probs.argmax(axis=1) == test["label"]).mean())
    mae = float(np.abs(next_close - test["next_close"]).mean())
    assert accuracy == pytest.approx(meta["metrics"]["test_accuracy"], abs=1e-9)
    assert mae == pytest.approx(meta["metrics"]["test_mae"], rel=1e-4)


def test_baselines_are_the_naive_answers_on_the_same_samples(trained, btc_dataset):
    index = load_index(btc_dataset)
    train, test = index[index.split == "train"], index[index.split == "test"]
    majority = train["label"].value_counts().idxmax()
    b = trained.package.meta.baseline_metrics
    assert b["majority_class"]["test_accuracy"] == pytest.approx((test["label"] == majority).mean())
    assert b["same_as_last_candle"]["test_accuracy"] == pytest.approx((test["label"] == test["last_label"]).mean())
    assert b["persistence"]["test_mae"] == pytest.approx((test["close"] - test["next_close"]).abs().mean())


def test_promotion_follows_the_validation_numbers(trained):
    meta = trained.package.meta
    m, b = meta.metrics, meta.baseline_metrics
    expect = (m["validation_accuracy"] > b["majority_class"]["validation_accuracy"]
              and m["validation_accuracy"] > b["same_as_last_candle"]["validation_accuracy"]
              and m["validation_mae"] < b["persistence"]["validation_mae"])
    assert meta.promoted is expect
    assert ("stored, not promoted" in meta.promotion_reason) is (not expect)


def test_the_model_card_shows_every_baseline_and_the_confusion_matrices(trained):
    card = (__import__("pathlib").Path(trained.package.uri) / "README.md").read_text()
    assert card.startswith("---\n")
    for word in ("majority_class", "same_as_last_candle", "persistence", "macro_f1", "Confusion matrices",
                 "test, model:", "validation, same_as_last_candle:"):
        assert word in card, word
    cm = trained.extra["confusion_matrices"]["test"]["model"]
    assert sum(map(sum, cm)) == trained.package.meta.ranges.test.rows
