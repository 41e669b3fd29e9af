"""No train/serve origin skew, end to end (issue 22 item 1): a dataset built with ``klinebus
dataset build --start`` from shipped real candles, the real features service on a real Redis warmed
from an archive of the same candles, and inference's engine holding a package that records the
dataset's ``feature_origin``. The first window the engine serves equals the dataset's first window
(OBV and VPT included: lstm-35-v1 carries both), and every features.v1 event carries the dataset's
origin. A features service whose archive starts elsewhere publishes another origin, and the same
package is then refused it.

The refusal's log line and metrics in detail are tested once, on inference's side
(tests/services/inference/test_intervals.py::test_a_window_from_another_feature_origin_is_refused_for_cumulative_features);
here they are only counted, to show that the origin the features service publishes is what drives them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from klinebus.cli import main as klinebus_main
from klinebus.pipeline import build_runtime
from libs.common import topics
from libs.common.archive import ParquetArchive
from libs.common.contracts import FeaturesEvent, KlineEvent
from libs.common.klines import read_kline_csv
from libs.common.telemetry import ServiceMetrics
from services.inference.package import load_package
from services.inference.server import Callables, Config, Inference, load_model
from services.trainer.datasets.sequence import SequenceDataset
from tests.candles import BTC_15M
from tests.services.inference.models import publish
from tests.streams import add_events, read_topic, wait_for_events

FEATURE_SET = "lstm-35-v1"  # has OBV and VPT, whose level depends on the origin
LOOKBACK = 20
HISTORY, LIVE = 1000, 150  # archived candles, then live ones on klines.v1
START = HISTORY + 50  # the dataset's --start: its first window lies among the live candles
KEY = ("BTCUSDT", "15m")
DEADLINE_S = 60.0


class Sink:
    def __init__(self) -> None:
        self.predictions: list = []

    async def publish(self, events, *key) -> None:
        self.predictions.extend(events)

    async def ignore(self, *args) -> None:
        pass


def iso_minute(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("dataset") / "lstm"
    start = read_kline_csv(BTC_15M, "BTCUSDT", "15m")[START].open_time
    assert klinebus_main(["dataset", "build", "--kind", "lstm-close", "--input", str(BTC_15M), "--symbols", "BTCUSDT",
                          "--intervals", "15m", "--feature-set", FEATURE_SET, "--lookback", str(LOOKBACK),
                          "--horizon", "2", "--start", iso_minute(start), "--out", str(out)]) == 0
    return out


async def served_events(redis_url, tmp_path, archive_first: int) -> list[FeaturesEvent]:
    """features.v1 from the real service, its archive holding candles ``archive_first:HISTORY``."""
    ks = read_kline_csv(BTC_15M, "BTCUSDT", "15m")
    ParquetArchive(str(tmp_path / "archive")).write(ks[archive_first:HISTORY])
    runtime = build_runtime("features", redis_url, tmp_path, feature_set=FEATURE_SET)
    await runtime.start(http=False)
    try:
        await add_events(redis_url, [KlineEvent.from_kline(k) for k in ks[HISTORY:HISTORY + LIVE]])
        await wait_for_events(redis_url, topics.FEATURES, LIVE)
    finally:
        await runtime.stop()
    return [FeaturesEvent.model_validate(d) for d in await read_topic(redis_url, topics.FEATURES)]


async def serving_engine(dataset, tmp_path, manifest: dict):
    """Inference's engine holding a package that records the dataset's origin, as a package the
    trainer built from this dataset would (``config.dataset``)."""
    ds = SequenceDataset(dataset)
    built = publish(tmp_path / "registry", tmp_path, "origin-check", features=tuple(ds.features), lookback=LOOKBACK,
                    feature_set=FEATURE_SET, config=dict(dataset=dict(
                        cumulative_features=manifest["cumulative_features"], series=manifest["series"])))
    sink, registry = Sink(), CollectorRegistry()
    engine = Inference(Config(), ServiceMetrics("inference", registry),
                       Callables(sink.publish, sink.ignore, sink.ignore, sink.ignore))
    spec = load_package(built.published.uri, built.published.sha256, tmp_path / "cache")
    served = await asyncio.to_thread(load_model, spec)
    engine.install(served)
    engine.needs_capacity(LOOKBACK)
    return engine, served, sink, registry


async def until(cond) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def test_the_served_first_window_equals_the_datasets_and_carries_its_origin(redis_url, tmp_path, dataset):
    manifest = json.loads((dataset / "manifest.json").read_text())
    ks = read_kline_csv(BTC_15M, "BTCUSDT", "15m")
    (series,) = manifest["series"]
    assert series["feature_origin"] == ks[0].open_time  # the file's first candle, not --start
    assert manifest["cumulative_features"] == ["obv", "vpt"]
    ds = SequenceDataset(dataset)
    train = ds.split("train")
    z = np.load(dataset / series["file"])
    a0 = int(z["anchors_train"][0])
    assert z["open_time"][a0 - LOOKBACK + 1] >= ks[START].open_time > z["open_time"][a0 - LOOKBACK]
    first_window = train.raw_features[train.window_index(np.array([0]), LOOKBACK)][0]

    events = await served_events(redis_url, tmp_path, archive_first=0)  # the archive holds the whole file
    assert [e.open_time for e in events] == [k.open_time for k in ks[HISTORY:HISTORY + LIVE]]
    assert {e.feature_origin for e in events} == {series["feature_origin"]}
    assert all(e.warm for e in events)

    engine, served, sink, registry = await serving_engine(dataset, tmp_path, manifest)
    engine.start()
    try:
        upto = [e for e in events if e.open_time <= int(z["open_time"][a0])]
        for ev in upto:
            engine.on_features(ev)
        window, _, reason = engine.windows.window(KEY, served.request)
        assert reason == ""
        scale = np.maximum(np.abs(first_window).max(axis=0), 1.0)
        assert np.max(np.abs(window - first_window) / scale) <= 1e-9
        await until(lambda: any(p.open_time == int(z["open_time"][a0]) for p in sink.predictions))
    finally:
        await engine.stop()
    refused = registry.get_sample_value("klinebus_inference_feature_origin_mismatches_total",
                                        {"model": "origin-check", "symbol": "BTCUSDT", "interval": "15m"})
    unknown = registry.get_sample_value("klinebus_inference_feature_origin_unknown_total", {"model": "origin-check"})
    assert refused is None and unknown is None


async def test_features_from_another_origin_are_refused_by_that_package(redis_url, tmp_path, dataset, caplog):
    manifest = json.loads((dataset / "manifest.json").read_text())
    ks = read_kline_csv(BTC_15M, "BTCUSDT", "15m")
    events = await served_events(redis_url, tmp_path, archive_first=100)  # an archive that starts later
    assert {e.feature_origin for e in events} == {ks[100].open_time}

    engine, served, sink, registry = await serving_engine(dataset, tmp_path, manifest)
    engine.start()
    try:
        with caplog.at_level(logging.ERROR, logger="klinebus.inference"):
            for ev in events:
                engine.on_features(ev)
            await engine.drain(DEADLINE_S)
    finally:
        await engine.stop()
    assert sink.predictions == []
    refused = registry.get_sample_value("klinebus_inference_feature_origin_mismatches_total",
                                        {"model": "origin-check", "symbol": "BTCUSDT", "interval": "15m"})
    assert refused == LIVE
    assert len([r for r in caplog.records if "refuses" in r.getMessage()]) == 1
