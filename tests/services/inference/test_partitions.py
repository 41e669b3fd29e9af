"""Inference replicas sharing the partitions of features.v1 (issue 23), on a real Redis with real
packages in onnxruntime: each replica owns some partitions and answers only their streams; every
candle is answered once per model whichever replica holds it; a model announced on models.v1
reaches every replica; a partition moving between replicas (a replica joining, one stopping)
keeps windows, pending forecasts and rolling scores as one replica would have them.

Expected forecasts come from each package's numpy twin over windows cut here from the events;
partitions from CRC-32 computed here (the agreed mapping), not from the service's code."""

from __future__ import annotations

import zlib

import pytest
from prometheus_client import CollectorRegistry

from libs.common import topics
from libs.common.bus import DATA_FIELD, redis_client
from libs.common.contracts import ScoreEvent
from libs.common.telemetry import ServiceMetrics
from services.inference import app
from services.inference.scoring import direction_hit
from services.inference.server import Callables, Config, Inference
from services.inference.settings import InferenceSettings
from tests.services.inference.harness import poll
from tests.services.inference.models import CONTROL_KEYS, feature_events, publish, window_of
from tests.streams import add_events, read_topic

FEATURES = ("close", "sma_20")
FIRST = 21  # skeleton-v1 is warm from candle 19; a window of 3 is full at 21
M15 = 900_000


def partition(symbol: str, interval: str, partitions: int) -> int:
    return zlib.crc32(f"{symbol}:{interval}".encode()) % partitions


def symbols(partitions: int, per: int) -> list[str]:
    """``per`` symbols in each partition, so every replica has streams to answer."""
    got: dict[int, list[str]] = {p: [] for p in range(partitions)}
    for i in range(1000):
        s = f"P{i:03d}USDT"
        bucket = got[partition(s, "15m", partitions)]
        if len(bucket) < per:
            bucket.append(s)
        if all(len(b) == per for b in got.values()):
            return [s for p in sorted(got) for s in got[p]]
    raise AssertionError("no spread of symbols found")


def replica(url: str, tmp_path, name: str, partitions: int, **kw):
    settings = InferenceSettings(data_dir=tmp_path / name, redis_url=url, consumer_name=name,
                                 model_dir=str(tmp_path / "reg"), max_wait_ms=1, control_keys=CONTROL_KEYS,
                                 partitions=partitions, **kw)
    return app.create(settings, url)


async def add_features(url: str, streams: dict[str, list], lo: int, hi: int, partitions: int) -> None:
    """Candles ``lo..hi-1`` of every stream, candle by candle, each on its partition's stream (as the
    features service publishes them)."""
    client = redis_client(url)
    try:
        for i in range(lo, hi):
            for s, events in streams.items():
                key = topics.stream_key(topics.FEATURES, partition(s, "15m", partitions))
                await client.xadd(key, {DATA_FIELD: events[i].to_json()})
    finally:
        await client.aclose()


async def forecasts(url: str, model: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for e in await read_topic(url, topics.PREDICTIONS):
        if e["model"] == model:
            out.setdefault(e["symbol"], []).append(e)
    return out


def answered(url: str, model: str, n: int):
    async def cond() -> bool:
        return sum(len(v) for v in (await forecasts(url, model)).values()) >= n
    return cond


def split(*runtimes, partitions: int):
    """Every replica owns some partitions, none twice, all of them owned, each one restored."""
    async def cond() -> bool:
        owned = [rt.bus.owned_partitions() for rt in runtimes]
        restored = [rt.inference.owned for rt in runtimes]
        return (all(owned) and sum(len(o) for o in owned) == partitions
                and set().union(*owned) == set(range(partitions))
                and [set(o) for o in owned] == restored)
    return cond


def check(streams: dict[str, list], got: dict[str, list[dict]], built_for, upto: int) -> None:
    """Each stream's candles FIRST..upto-1 answered once, in order, with the value the version
    ``built_for(i)`` gives for the window cut here from the events."""
    assert sorted(got) == sorted(streams)
    for s, events in streams.items():
        assert [e["open_time"] for e in got[s]] == [ev.open_time for ev in events[FIRST:upto]], s
        for e, i in zip(got[s], range(FIRST, upto)):
            built = built_for(i)
            assert e["model_version"] == built.published.version, (s, i)
            want = built.expected(window_of(events, i, FEATURES, 3))[0]
            assert e["predicted"]["close"] == pytest.approx(want, rel=1e-6), (s, i)
            assert e["target_open_time"] == e["open_time"] + M15 and e["last_close"] == events[i].close


async def test_two_replicas_split_four_partitions_and_answer_every_candle_once(redis_url, tmp_path):
    streams = {s: feature_events(40, symbol=s) for s in symbols(4, 1)}
    built = publish(tmp_path / "reg", tmp_path, "uni", seed=7, serves=[(s, "15m") for s in streams])
    a, b = replica(redis_url, tmp_path, "a", 4), replica(redis_url, tmp_path, "b", 4)
    await a.start(http=False)
    await b.start(http=False)
    try:
        await poll(split(a, b, partitions=4))
        assert a.health.status()[1]["partitions"] and b.health.status()[1]["partitions"]
        await add_features(redis_url, streams, 0, 40, 4)
        await poll(answered(redis_url, "uni", 4 * (40 - FIRST)))
        await poll(answered(redis_url, "persistence", 4 * 40))
        held = {name: set(rt.inference.engine.windows.keys()) for name, rt in (("a", a), ("b", b))}
    finally:
        await a.stop()
        await b.stop()
    # Stopped (every queue drained): a doubled forecast would be on the stream now.
    check(streams, await forecasts(redis_url, "uni"), lambda i: built, 40)
    persistence = await forecasts(redis_url, "persistence")
    assert {s: [e["open_time"] for e in persistence[s]] for s in streams} == {
        s: [ev.open_time for ev in events] for s, events in streams.items()}
    # Each replica held windows only for the streams of its own partitions.
    assert held["a"] and held["b"] and not held["a"] & held["b"]
    assert held["a"] | held["b"] == {(s, "15m") for s in streams}


async def test_a_model_announced_on_models_v1_reaches_every_replica(redis_url, tmp_path):
    streams = {s: feature_events(50, symbol=s) for s in symbols(2, 1)}
    serves = [(s, "15m") for s in streams]
    v1 = publish(tmp_path / "reg", tmp_path, "uni", seed=1, serves=serves)
    a, b = replica(redis_url, tmp_path, "a", 2), replica(redis_url, tmp_path, "b", 2)
    await a.start(http=False)
    await b.start(http=False)
    try:
        await poll(split(a, b, partitions=2))
        await add_features(redis_url, streams, 0, 30, 2)
        await poll(answered(redis_url, "uni", 2 * (30 - FIRST)))
        v2 = publish(tmp_path / "reg", tmp_path, "uni", seed=2, serves=serves)
        await add_events(redis_url, [v2.announcement()])

        async def both_swapped() -> bool:
            return all(rt.inference.engine.router.get("uni").spec.version == "2" for rt in (a, b))

        await poll(both_swapped)
        await add_features(redis_url, streams, 30, 50, 2)
        await poll(answered(redis_url, "uni", 2 * (50 - FIRST)))
    finally:
        await a.stop()
        await b.stop()
    check(streams, await forecasts(redis_url, "uni"), lambda i: v1 if i < 30 else v2, 50)
    assert await read_topic(redis_url, topics.DEAD_LETTERS) == []


async def test_a_partition_moving_between_replicas_keeps_windows_pending_forecasts_and_scores(redis_url, tmp_path):
    """One replica owns both partitions; a second joins and takes one (the first releases it); then
    the first stops and the second takes everything. Forecasts, scores and rolling scores equal
    what one uninterrupted replica gives: the offline computation here."""
    streams = {s: feature_events(60, symbol=s) for s in symbols(2, 2)}
    built = publish(tmp_path / "reg", tmp_path, "uni", seed=5, serves=[(s, "15m") for s in streams])
    kw = dict(score_window=10, behind_min_samples=5)
    a = replica(redis_url, tmp_path, "a", 2, **kw)
    await a.start(http=False)
    b = replica(redis_url, tmp_path, "b", 2, **kw)
    try:
        await poll(lambda: _owns(a, {0, 1}))
        await add_features(redis_url, streams, 0, 30, 2)
        await poll(answered(redis_url, "uni", 4 * (30 - FIRST)))
        await b.start(http=False)
        await poll(split(a, b, partitions=2))
        await add_features(redis_url, streams, 30, 45, 2)
        await poll(answered(redis_url, "uni", 4 * (45 - FIRST)))
        await a.stop()
        await poll(lambda: _owns(b, {0, 1}))
        await add_features(redis_url, streams, 45, 60, 2)
        await poll(answered(redis_url, "uni", 4 * (60 - FIRST)))
    finally:
        await a.stop()
        await b.stop()
    got = await forecasts(redis_url, "uni")
    check(streams, got, lambda i: built, 60)
    scores: dict[str, list[ScoreEvent]] = {}
    for e in await read_topic(redis_url, topics.SCORES):
        if e["model"] == "uni":
            scores.setdefault(e["symbol"], []).append(ScoreEvent.model_validate(e))
    for s, events in streams.items():
        close = {ev.open_time: ev.close for ev in events}
        rows = []  # offline: each forecast against the close of its target candle
        for p in got[s]:
            if p["target_open_time"] in close:
                actual = close[p["target_open_time"]]
                rows.append((p["target_open_time"], abs(p["predicted"]["close"] - actual),
                             abs(p["last_close"] - actual), direction_hit(p["predicted"]["close"], p["last_close"], actual)))
        # Every forecast scored once, the ones whose target closed after a move too (restored pending).
        assert [x.open_time for x in scores[s]] == [r[0] for r in rows], s
        for k, (x, r) in enumerate(zip(scores[s], rows)):
            last = rows[max(0, k - 9): k + 1]  # the rolling window crosses both moves
            assert (x.abs_error, x.baseline_abs_error) == pytest.approx(r[1:3]) and x.direction_hit == r[3]
            assert x.rolling_mae == pytest.approx(sum(y[1] for y in last) / len(last)), (s, k)
            assert x.window == len(last), (s, k)


async def _owns(rt, partitions: set[int]) -> bool:
    return rt.bus.owned_partitions() == partitions and rt.inference.owned == partitions


class _Sink:
    def __init__(self) -> None:
        self.predictions: list = []

    async def publish(self, events, *key) -> None:
        self.predictions.extend(events)

    async def nothing(self, *args) -> None:
        return None


async def test_forgetting_a_partitions_streams_waits_for_their_forecasts_and_keeps_the_others(tmp_path):
    from services.inference.package import load_package
    from services.inference.server import load_model

    streams = {s: feature_events(25, symbol=s) for s in ("AAAUSDT", "BBBUSDT")}
    built = publish(tmp_path / "reg", tmp_path, "uni", serves=[(s, "15m") for s in streams])
    sink = _Sink()
    registry = CollectorRegistry()
    eng = Inference(Config(max_wait_ms=1), ServiceMetrics("inference", registry),
                    Callables(sink.publish, sink.nothing, sink.nothing, sink.nothing))
    eng.needs_capacity(3)
    eng.install(load_model(load_package(built.published.uri, built.published.sha256, tmp_path / "cache")))
    eng.start()
    try:
        for i in range(25):
            for events in streams.values():
                eng.on_features(events[i])
        mine = lambda key: key[0] == "AAAUSDT"  # noqa: E731
        assert await eng.settle(mine, 30.0)
        # Every forecast of the stream was published before its state is dropped.
        assert sorted(e.open_time for e in sink.predictions if e.symbol == "AAAUSDT" and e.model == "uni") == [
            ev.open_time for ev in streams["AAAUSDT"][FIRST:]]
        assert eng.owed(mine) == 0
        assert eng.forget(mine) == [("AAAUSDT", "15m")]
        assert eng.windows.keys() == [("BBBUSDT", "15m")]
        assert [k for k in eng.scorer.rolling if k[1] == "AAAUSDT"] == []
        assert [k for k in eng.scorer.rolling if k[1] == "BBBUSDT"]
        # Its score series are gone from /metrics; the other stream's stay.
        labels = dict(model="uni", symbol="AAAUSDT", interval="15m", horizon="1")
        assert registry.get_sample_value("klinebus_inference_score_mae", labels) is None
        assert registry.get_sample_value("klinebus_inference_score_mae", {**labels, "symbol": "BBBUSDT"}) is not None
    finally:
        await eng.stop()
