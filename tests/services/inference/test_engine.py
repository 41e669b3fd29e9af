"""The inference engine with real packages in onnxruntime: micro-batches, a slow model beside a fast
one, and a version swap in the middle of a stream."""

from __future__ import annotations

import threading

import pytest
from prometheus_client import CollectorRegistry

from libs.common.telemetry import ServiceMetrics
from services.inference.baseline import ensure_persistence_model, persistence_spec
from services.inference.package import load_package
from services.inference.server import Callables, Config, Inference, ServedModel, load_model
from tests.services.inference.models import feature_events, publish, window_of
from tests.services.inference.harness import until

SYMBOLS = [f"S{i:03d}USDT" for i in range(40)]


class Sink:
    """What the engine publishes, per topic (predictions in ``events``)."""

    def __init__(self) -> None:
        self.events: list = []
        self.scores: list = []
        self.alerts: list = []
        self.dead: list[str] = []

    async def publish(self, events, *key) -> None:
        self.events.extend(events)

    async def publish_scores(self, events, *key) -> None:
        self.scores.extend(events)

    async def publish_alerts(self, events, *key) -> None:
        self.alerts.extend(events)

    async def dead_letter(self, source, raw, reason) -> None:
        self.dead.append(reason)


def engine(sink: Sink, **config) -> Inference:
    return Inference(Config(**config), ServiceMetrics("inference", CollectorRegistry()),
                     Callables(sink.publish, sink.publish_scores, sink.publish_alerts, sink.dead_letter))



def served(built, tmp_path) -> ServedModel:
    return load_model(load_package(built.published.uri, built.published.sha256, tmp_path / "cache"))


async def test_a_burst_of_closes_runs_as_few_session_calls_per_model(tmp_path):
    """40 symbols close together: the unified model answers all of them in micro-batches."""
    built = publish(tmp_path / "reg", tmp_path, "unified-15m", serves=[(s, "15m") for s in SYMBOLS])
    sink = Sink()
    eng = engine(sink, max_batch=64, max_wait_ms=50)
    model = served(built, tmp_path)
    calls: list[int] = []
    real = model.runner.predict
    model.runner.predict = lambda w, c: calls.append(len(w)) or real(w, c)
    eng.needs_capacity(3)
    eng.install(model)
    streams = {s: feature_events(30, symbol=s) for s in SYMBOLS}
    for i in range(27):  # history: not answered (the batcher is not started, so nothing runs yet)
        for s in SYMBOLS:
            eng.windows.push(s, "15m", streams[s][i].open_time, streams[s][i].close, "skeleton-v1", streams[s][i].values)
    eng.start()
    for s in SYMBOLS:
        eng.on_features(streams[s][27])
    await until(lambda: len(sink.events) == len(SYMBOLS))
    await eng.stop()
    assert sum(calls) == len(SYMBOLS) and len(calls) < len(SYMBOLS) // 4, calls
    for ev in sink.events:
        want = built.expected(window_of(streams[ev.symbol], 27, ("close", "sma_20"), 3))[0]
        assert ev.predicted["close"] == pytest.approx(want, rel=1e-6)
        assert (ev.model, ev.model_version, ev.target_open_time) == ("unified-15m", "1", ev.open_time + 900_000)


async def test_a_slow_model_never_delays_another_models_forecasts(tmp_path):
    fast = publish(tmp_path / "reg", tmp_path, "fast")
    slow = publish(tmp_path / "reg", tmp_path, "slow")
    sink = Sink()
    eng = engine(sink, max_wait_ms=1)
    gate = threading.Event()
    slow_model = served(slow, tmp_path)
    real = slow_model.runner.predict

    def held(w, c):  # deliberately slow: its session call cannot finish until the test says so
        assert gate.wait(60)
        return real(w, c)

    slow_model.runner.predict = held
    eng.needs_capacity(3)
    eng.install(served(fast, tmp_path))
    eng.install(slow_model)
    eng.install(load_model(persistence_spec(ensure_persistence_model(tmp_path))))
    eng.start()
    events = feature_events(40)
    for ev in events:
        eng.on_features(ev)
    answered = [ev.open_time for ev in events[21:]]  # warm from 19, window of 3
    by = lambda name: [e.open_time for e in sink.events if e.model == name]  # noqa: E731
    await until(lambda: by("fast") == answered and by("persistence") == [e.open_time for e in events])
    assert by("slow") == []  # still stuck in its first session call
    gate.set()
    await until(lambda: by("slow") == answered)
    await eng.stop()
    assert sink.dead == []


async def test_a_swap_mid_stream_drops_nothing_doubles_nothing_and_names_each_version(tmp_path):
    v1 = publish(tmp_path / "reg", tmp_path, "m", seed=1)
    v2 = publish(tmp_path / "reg", tmp_path, "m", seed=2)
    sink = Sink()
    eng = engine(sink, max_wait_ms=20)
    eng.needs_capacity(3)
    eng.install(served(v1, tmp_path))
    eng.start()
    events = feature_events(60)
    for ev in events[:40]:
        eng.on_features(ev)
    eng.install(served(v2, tmp_path))  # between candle 39 and 40; v1's queued windows still run on v1
    for ev in events[40:]:
        eng.on_features(ev)
    await until(lambda: len(sink.events) == 60 - 21)
    await eng.stop()
    assert [e.open_time for e in sink.events] == [e.open_time for e in events[21:]]
    for e, i in zip(sink.events, range(21, 60)):
        built = v1 if i < 40 else v2
        assert e.model_version == built.published.version
        assert e.predicted["close"] == pytest.approx(built.expected(window_of(events, i, ("close", "sma_20"), 3))[0], rel=1e-6)


async def test_a_model_that_fails_at_run_time_is_a_reasoned_dead_letter_per_candle(tmp_path):
    built = publish(tmp_path / "reg", tmp_path, "flaky")
    sink = Sink()
    eng = engine(sink, max_wait_ms=1)
    model = served(built, tmp_path)
    model.runner.run = lambda x: [x[:, :1, 0] * float("nan")]  # answers NaN
    eng.needs_capacity(3)
    eng.install(model)
    eng.start()
    for ev in feature_events(23):
        eng.on_features(ev)
    await until(lambda: len(sink.dead) == 2)
    await eng.stop()
    assert sink.events == []
    assert all("model flaky@1 failed on BTCUSDT 15m" in r and "NaN" in r for r in sink.dead)


async def test_a_model_behind_persistence_is_demoted_to_shadow_when_configured(tmp_path):
    # Forecasts 150 above a window average: far behind persistence on 15m closes.
    built = publish(tmp_path / "reg", tmp_path, "laggy", seed=5, bias=150.0)
    sink = Sink()
    eng = engine(sink, max_wait_ms=1, demote_behind=True, behind_min_samples=3, score_window=5)
    eng.needs_capacity(3)
    eng.install(served(built, tmp_path))
    eng.start()
    events = feature_events(40)
    for ev in events:
        eng.on_features(ev)
        await until(lambda: eng.batchers["laggy"].pending == 0 and eng.out_scores.pending == 0)
    await until(lambda: len(sink.events) == 40 - 21)
    await eng.stop()
    roles = [(e.role, s.behind) for e, s in zip(sink.events[1:], sink.scores)]
    assert sink.scores[-1].behind and sink.events[-1].role == "shadow"
    # Each forecast is demoted exactly when the scores before it say the model is behind.
    assert all(role == ("shadow" if behind else "primary") for role, behind in roles)
    assert sink.events[0].role == "primary"
