"""The chart classifier served on charts.v1 against a real Redis: a package built by the trainer's
own code (a real dataset of shipped BTCUSDT candles rendered by the charts renderer, a tiny
ViT + BERT trained a few steps, exported, packaged with its tokenizer), a chart event in, a
prediction out with the values the package gives when run here directly (onnxruntime, the
packaged tokenizer, the dataset's own text); bad charts and a package without its tokenizer
refused with one line, a dead letter and a metric while serving goes on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from libs.common import topics
from libs.common.contracts import ChartEvent, DeadLetter, KlineEvent, ModelPublished
from services.inference import app
from services.inference.settings import InferenceSettings
from tests.candles import load
from tests.services.inference.models import CONTROL_KEYS, KEYRING
from tests.services.inference.test_app import metric, poll
from tests.services.trainer.classifier.conftest import (
    BTC_15M,
    BTC_15M_START,
    WINDOW,
    charts_renderer,
    minilm_dir,
    tiny_text,
    tiny_vision,
)
from tests.streams import add_events, read_topic, wait_for_events

pytestmark = pytest.mark.slow  # renders ~120 charts and trains a tiny model (about half a minute on 2 cores)
M15 = 900_000


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    from services.trainer.classifier.dataset import load_index
    from services.trainer.classifier.pipeline import ClassifierOptions, train_chart_classifier
    from services.trainer.datasets import BuildSpec, build_dataset

    root = tmp_path_factory.mktemp("chart-serving")
    ds = root / "ds"
    build_dataset(BuildSpec(
        kind="chart-classifier", inputs=[str(BTC_15M)], out=ds, symbols=["BTCUSDT"], intervals=["15m"],
        start=BTC_15M_START, lookback=WINDOW, train_fraction=0.5, validation_fraction=0.25,
        extra={"renderer": charts_renderer(), "workers": 0},
    ))
    result = train_chart_classifier(ds, ClassifierOptions(
        registry=str(root / "reg"), vision=tiny_vision(), text=tiny_text(30522), tokenizer=str(minilm_dir()),
        epochs=1, lr=1e-3, batch_size=8, seed=0, max_batches=4,
    ))
    return ds, root / "reg", result.package, load_index(ds)


def expected(pkg: Path, row, image_path: Path) -> tuple[np.ndarray, float]:
    """What the package answers for one chart, computed here: the packaged tokenizer on the
    dataset's text (written by the trainer when it built the dataset), the PNG, onnxruntime."""
    from transformers import AutoTokenizer

    meta = json.loads((pkg / "klinebus.json").read_text())
    n_tok = meta["inputs"][1]["shape"][1]
    enc = AutoTokenizer.from_pretrained(pkg / "tokenizer")([row["text"]], padding="max_length", truncation=True,
                                                           max_length=n_tok, return_tensors="np")
    image = np.asarray(Image.open(image_path).convert("RGB"))[None]
    sess = ort.InferenceSession(str(pkg / "model.onnx"), providers=["CPUExecutionProvider"])
    probs, scaled = sess.run(None, {"image": image, "input_ids": enc["input_ids"].astype(np.int64),
                                    "attention_mask": enc["attention_mask"].astype(np.int64)})
    scale = meta["scalers"]["next_close"]["scale"][0]
    return probs[0].astype(np.float64), float(row["close"]) * (1 + float(np.asarray(scaled).reshape(-1)[0]) * scale)


def kline(i: int) -> KlineEvent:
    c = load(BTC_15M)
    t = int(c.open_time[i])
    return KlineEvent(symbol="BTCUSDT", interval="15m", open_time=t, close_time=t + M15 - 1, open=float(c.open[i]),
                      high=float(c.high[i]), low=float(c.low[i]), close=float(c.close[i]), volume=float(c.volume[i]))


def chart(row, uri: str, window: int = WINDOW) -> ChartEvent:
    return ChartEvent(symbol="BTCUSDT", interval="15m", open_time=int(row["open_time"]), uri=uri, window=window,
                      first_open_time=int(row["first_open_time"]), preset="classifier224", width=224, height=224)


async def test_a_chart_event_in_a_prediction_out_and_bad_charts_dead_lettered(redis_url, tmp_path, classifier):
    ds, registry, pkg, index = classifier
    folder = Path(pkg.uri)
    rows = index.tail(4).reset_index(drop=True)
    c = load(BTC_15M)
    pos = {int(t): i for i, t in enumerate(c.open_time)}
    await add_events(redis_url, [kline(pos[int(r["open_time"])]) for _, r in rows.iterrows()])
    corrupt = ds / "corrupt.png"  # under the artefact root (the dataset's folder here): read, then refused
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n torn")
    small = ds / "small.png"
    Image.new("RGB", (100, 100), "white").save(small)
    bad_before = metric("chart_errors_total", model=pkg.name, reason="bad_image")
    settings = InferenceSettings(data_dir=tmp_path, redis_url=redis_url, consumer_name="t", model_dir=str(registry),
                                 serve_unpromoted=True, artifact_url=str(ds), control_keys=CONTROL_KEYS)
    rt = app.create(settings, redis_url)
    await rt.start(http=False)
    try:
        good = [chart(r, str(ds / r["image_path"])) for _, r in rows.iterrows()]
        no_candle = rows.iloc[0].copy()
        no_candle["open_time"] = int(no_candle["open_time"]) - 100 * M15  # its candle is not on klines.v1
        await add_events(redis_url, [
            good[0],
            chart(rows.iloc[1], str(corrupt)),  # a corrupt image at a later candle: refused
            good[1].model_copy(update={"uri": str(small)}),  # another size: refused (same candle as the next)
            chart(rows.iloc[2], str(ds / rows.iloc[2]["image_path"]), window=WINDOW + 5),  # another window
            chart(no_candle, str(ds / no_candle["image_path"])),
            good[3],
        ])
        letters = await wait_for_events(redis_url, topics.DEAD_LETTERS, 4)

        async def answered() -> bool:
            return len([e for e in await read_topic(redis_url, topics.PREDICTIONS) if e["model"] == pkg.name]) >= 2

        await poll(answered, 120)
        got = [e for e in await read_topic(redis_url, topics.PREDICTIONS) if e["model"] == pkg.name]

        # A package without its tokenizer is refused; the version serving keeps serving.
        broken = registry / pkg.name / "2"  # under the registry root: a source inference loads from
        shutil.copytree(folder, broken)
        shutil.rmtree(broken / "tokenizer")
        doc = json.loads((broken / "klinebus.json").read_text())
        doc["version"] = "2"
        (broken / "klinebus.json").write_text(json.dumps(doc))
        failures = metric("model_load_failures_total", model=pkg.name)
        await add_events(redis_url, [KEYRING.sign(topics.MODELS, ModelPublished(
            model=pkg.name, version="2", uri=str(broken), sha256=pkg.sha256, feature_set=doc["feature_set"],
            train_range=(0, 10), eval_range=(40, 50), metrics={}, baseline_metrics={}, promoted=True))])
        letters = await wait_for_events(redis_url, topics.DEAD_LETTERS, 5)
        assert metric("model_load_failures_total", model=pkg.name) == failures + 1
        assert metric("model_info", model=pkg.name, version=pkg.version, kind="chart-classifier") == 1.0
    finally:
        await rt.stop()

    assert [e["open_time"] for e in got] == [int(rows.iloc[0]["open_time"]), int(rows.iloc[3]["open_time"])]
    for e, i in zip(got, (0, 3)):
        probs, next_close = expected(folder, rows.iloc[i], ds / rows.iloc[i]["image_path"])
        assert [e["probabilities"][k] for k in ("bearish", "neutral", "bullish")] == pytest.approx(probs.tolist(), abs=1e-5)
        assert e["predicted"]["close"] == pytest.approx(next_close, rel=1e-6)
        assert e["predicted"]["class"] == float(np.argmax(probs))
        assert e["last_close"] == pytest.approx(float(rows.iloc[i]["close"]))
        assert e["target_open_time"] == e["open_time"] + M15 and e["model_version"] == pkg.version
        assert e["role"] == ("primary" if json.loads((folder / "klinebus.json").read_text())["promoted"] else "shadow")
    dead = [DeadLetter.model_validate(d) for d in letters]
    reasons = [d.reason for d in dead]
    assert all("\n" not in r for r in reasons)
    assert [d.source for d in dead] == [topics.CHARTS] * 4 + [topics.MODELS]
    assert "not a readable image" in reasons[0]
    assert "chart is 100x100 px, the model takes 224x224" in reasons[1]
    assert f"it shows {WINDOW + 5} candles, the model reads {WINDOW}" in reasons[2]
    assert "is not on klines.v1" in reasons[3]
    assert reasons[4].startswith(f"model {pkg.name}@2 refused: ") and "no tokenizer" in reasons[4]
    assert reasons[4].endswith(f"still serving {pkg.name}@{pkg.version}")
    assert metric("chart_errors_total", model=pkg.name, reason="bad_image") == bad_before + 2


async def test_with_partitions_a_charts_candle_is_read_from_its_pairs_partition(redis_url, tmp_path, classifier):
    """P=4: BTCUSDT 15m is in partition 2 (CRC-32 of "BTCUSDT:15m" % 4, computed here), so its
    candles are on klines.v1's partition-2 stream only; the chart is still answered."""
    import zlib

    from libs.common.bus import DATA_FIELD, redis_client

    partitions = 4
    part = zlib.crc32(b"BTCUSDT:15m") % partitions
    assert part == 2
    ds, shared, pkg, index = classifier
    registry = tmp_path / "reg"  # the package alone: the test above leaves a broken version 2 in the shared one
    shutil.copytree(Path(pkg.uri), registry / pkg.name / pkg.version)
    rows = index.tail(2).reset_index(drop=True)
    c = load(BTC_15M)
    pos = {int(t): i for i, t in enumerate(c.open_time)}
    client = redis_client(redis_url)
    try:
        for _, r in rows.iterrows():
            await client.xadd(topics.stream_key(topics.KLINES, part), {DATA_FIELD: kline(pos[int(r["open_time"])]).to_json()})
    finally:
        await client.aclose()
    settings = InferenceSettings(data_dir=tmp_path, redis_url=redis_url, consumer_name="t", model_dir=str(registry),
                                 serve_unpromoted=True, artifact_url=str(ds), control_keys=CONTROL_KEYS,
                                 partitions=partitions)
    rt = app.create(settings, redis_url)
    await rt.start(http=False)
    try:
        await add_events(redis_url, [chart(r, str(ds / r["image_path"])) for _, r in rows.iterrows()])

        async def answered() -> bool:
            return len([e for e in await read_topic(redis_url, topics.PREDICTIONS) if e["model"] == pkg.name]) >= 2

        await poll(answered, 120)
    finally:
        await rt.stop()
    got = [e for e in await read_topic(redis_url, topics.PREDICTIONS) if e["model"] == pkg.name]
    assert [e["open_time"] for e in got] == [int(r["open_time"]) for _, r in rows.iterrows()]
    assert await read_topic(redis_url, topics.DEAD_LETTERS) == []
