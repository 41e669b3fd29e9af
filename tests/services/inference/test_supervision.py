"""Supervised workers without a bus: a batcher or an outbox that fails restarts itself, says so
while it is down, loses nothing to a transient failure, and dead-letters an item that never
goes through instead of blocking everything behind it."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from prometheus_client import CollectorRegistry

from libs.common.telemetry import ServiceMetrics
from services.inference.batching import MAX_TRIES, Job, MicroBatcher, Outbox
from services.inference.package import load_package
from services.inference.server import Callables, Config, Inference, load_model
from tests.services.inference.models import feature_events
from tests.services.inference.models import publish as publish_package
from tests.services.inference.harness import until



class Refused(ConnectionError):
    """What a write refused by the infrastructure looks like to the workers (transient)."""


async def test_an_outbox_dead_letters_an_unpublishable_event_and_the_events_behind_it_flow():
    published: list[str] = []
    tries: dict[str, int] = {}
    given_up: list[tuple[str, str]] = []

    async def publish(events, *key) -> None:
        for e in events:
            tries[e] = tries.get(e, 0) + 1
        if "poison" in events:
            raise ValueError("Redis will never take this one")
        published.extend(events)

    async def give_up(event, reason) -> None:
        given_up.append((event, reason))

    out = Outbox("outbox:t", publish, give_up=give_up)
    out.start()
    for e in ("a", "b", "poison", "c"):
        out.put(e, "k")
    await until(lambda: given_up and published[-1:] == ["c"])
    out.put("d", "k")  # and later events flow as usual
    await until(lambda: published[-1:] == ["d"])
    await out.stop()
    assert published == ["a", "b", "c", "d"]
    assert [e for e, _ in given_up] == ["poison"] and "Redis will never take this one" in given_up[0][1]
    # bounded: the chunk it was in, then the event alone, each MAX_TRIES times
    assert tries["poison"] == 2 * MAX_TRIES
    assert out.ok and out.restarts == 2 * MAX_TRIES


async def test_an_outbox_waits_out_a_transient_failure_losing_and_doubling_nothing():
    published: list[int] = []
    refusing = True
    seen_down = []

    async def publish(events, *key) -> None:
        if refusing:
            raise Refused("OOM command not allowed")
        published.extend(events)

    async def give_up(event, reason) -> None:  # pragma: no cover - must not happen
        raise AssertionError(f"gave up {event}: {reason}")

    out = Outbox("outbox:t", publish, give_up=give_up)
    out.start()
    for i in range(10):
        out.put(i, "k")
    await until(lambda: not out.ok)
    seen_down.append(out.failing)
    await until(lambda: out.restarts > MAX_TRIES)  # well past the tries an item gets: nothing is given up
    refusing = False
    await until(lambda: len(published) == 10)
    await until(lambda: out.ok)
    await out.stop()
    assert published == list(range(10))
    assert "OOM command not allowed" in seen_down[0]


class Model:
    def __init__(self) -> None:
        self.spec = SimpleNamespace(name="m", label="m@1")
        self.calls = 0

    def predict(self, windows, closes):
        self.calls += 1
        return [float(w.sum()) for w in windows]


async def test_a_batcher_whose_results_cannot_be_handed_on_comes_back_and_runs_no_session_twice():
    model = Model()
    got: list[tuple[int, float]] = []
    refusing = True

    async def on_result(job, res) -> None:
        if refusing and job.open_time == 3:
            raise Refused("READONLY You can't write against a read only replica")
        got.append((job.open_time, res))

    b = MicroBatcher("batcher:m", on_result, max_batch=64, max_wait_s=0.05)
    b.start()
    for t in range(6):
        b.submit(Job(model, "BTCUSDT", "15m", t, np.full(2, float(t)), 1.0))
    await until(lambda: not b.ok)
    assert "READONLY" in b.failing and b.pending == 3  # jobs 3, 4, 5 kept in hand
    refusing = False
    await until(lambda: len(got) == 6)
    await until(lambda: b.ok)
    await b.stop()
    assert got == [(t, 2.0 * t) for t in range(6)]
    assert model.calls == 1 and b.restarts >= 1


def engine(sink: SimpleNamespace) -> Inference:
    return Inference(Config(max_wait_ms=1), ServiceMetrics("inference", CollectorRegistry()),
                     Callables(sink.publish, sink.publish, sink.publish, sink.dead_letter))


async def test_the_engine_keeps_a_forecast_error_until_its_dead_letter_is_written(tmp_path):
    letters: list[str] = []
    refusing = True

    async def dead_letter(source, raw, reason) -> None:
        if refusing:
            raise Refused("OOM command not allowed when used memory > 'maxmemory'")
        letters.append(raw["open_time"])

    async def publish(events, *key) -> None:
        return None

    eng = engine(SimpleNamespace(publish=publish, dead_letter=dead_letter))
    eng.needs_capacity(3)
    built = publish_package(tmp_path / "reg", tmp_path, "broken")
    model = load_model(load_package(built.published.uri, built.published.sha256, tmp_path / "cache"))
    model.runner.predict = _session_fails
    eng.install(model)
    eng.start()
    events = feature_events(25)
    for ev in events:
        eng.on_features(ev)
    await until(lambda: "batcher:broken" in eng.failing())
    assert "OOM" in eng.failing()["batcher:broken"] and letters == []
    refusing = False
    answered = [ev.open_time for ev in events[21:]]  # warm from 19, a window of 3
    await until(lambda: letters == answered)
    await until(lambda: eng.failing() == {})
    await eng.stop()


def _session_fails(windows, closes):
    raise RuntimeError("session failed")


async def test_an_outbox_whose_last_event_was_poison_works_again_with_nothing_behind_it():
    given_up: list[str] = []

    async def publish(events, *key) -> None:
        if "poison" in events:
            raise ValueError("never")

    async def give_up(event, reason) -> None:
        given_up.append(event)

    out = Outbox("outbox:t", publish, give_up=give_up)
    out.start()
    out.put("poison", "k")
    await until(lambda: given_up == ["poison"])
    await until(lambda: out.pending == 0)
    ok = out.ok
    await out.stop()
    assert ok  # a quiet topic is not left "failing" once its poison is dead-lettered
