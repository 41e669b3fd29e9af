"""The inference service on a real Redis when a worker fails: a dead-letter write Redis refuses
(OOM) inside a model's batcher, and a forecast Redis will never take inside the predictions
outbox. The worker comes back, /readyz names it while it is down, nothing is lost, and the
unpublishable forecast is dead-lettered instead of blocking every forecast behind it."""

from __future__ import annotations

import aiohttp
import orjson
import redis.exceptions as rex

from libs.common import topics
from libs.common.bus.guard import OncePerCandle
from libs.common.contracts import DeadLetter
from services.inference import model_runner
from tests.services.inference.models import feature_events, publish
from tests.services.inference.harness import metric, poll, runtime
from tests.streams import add_events, read_topic

FIRST = 21  # skeleton-v1 is warm from candle 19; a window of 3 is full at 21


async def letters(url: str, source: str) -> list[DeadLetter]:
    return [d for d in (DeadLetter.model_validate(e) for e in await read_topic(url, topics.DEAD_LETTERS))
            if d.source == source]


async def test_a_refused_dead_letter_write_in_a_batcher_is_shown_waited_out_and_loses_nothing(
        redis_url, tmp_path, monkeypatch):
    publish(tmp_path / "reg", tmp_path, "broken")
    real_predict = model_runner.OnnxModel.predict
    broken = False  # loads and warms up; fails on every candle once the service runs

    def predict(self, windows, last_close):
        if broken and self.spec.name == "broken":
            raise model_runner.ModelOutputError("NaN in the output")
        return real_predict(self, windows, last_close)

    monkeypatch.setattr(model_runner.OnnxModel, "predict", predict)
    events = feature_events(30)
    rt = runtime(redis_url, tmp_path)
    await rt.start(http=True)
    broken = True
    real_write = rt.bus.dead_letters.write
    refusing = True

    async def write(source, raw, reason):
        if refusing:
            raise rex.OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")
        await real_write(source, raw, reason)

    monkeypatch.setattr(rt.bus.dead_letters, "write", write)
    try:
        await add_events(redis_url, events)

        async def shown() -> bool:
            status, body = await readyz(rt)
            return status == 503 and body["checks"].get("batcher:broken") is False

        await poll(shown)
        assert metric("worker_failing", worker="batcher:broken") == 1.0
        assert metric("worker_restarts_total", worker="batcher:broken") >= 1
        refusing = False

        async def every_candle_dead_lettered() -> bool:
            return len(await letters(redis_url, topics.FEATURES)) >= len(events) - FIRST

        await poll(every_candle_dead_lettered)

        async def ready_again() -> bool:
            return (await readyz(rt))[0] == 200

        await poll(ready_again)
        assert metric("worker_failing", worker="batcher:broken") == 0.0
        await add_events(redis_url, feature_events(32)[30:])  # the batcher goes on serving
        await poll(lambda: _count(redis_url, topics.FEATURES, 32 - FIRST))
        got = await letters(redis_url, topics.FEATURES)
        persistence = [e["open_time"] for e in await read_topic(redis_url, topics.PREDICTIONS)
                       if e["model"] == "persistence"]
    finally:
        await rt.stop()
    candles = feature_events(32)
    assert [orjson.loads(d.payload)["open_time"] for d in got] == [e.open_time for e in candles[FIRST:]]
    assert all("model broken@1 failed" in d.reason and "NaN in the output" in d.reason for d in got)
    assert persistence == [e.open_time for e in candles]  # the other model never waited


async def readyz(rt) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{rt.http_port}/readyz") as resp:
            return resp.status, await resp.json()


async def _count(url: str, source: str, n: int) -> bool:
    return len(await letters(url, source)) >= n


async def test_an_unpublishable_forecast_is_dead_lettered_after_bounded_tries_and_later_ones_flow(
        redis_url, tmp_path, monkeypatch):
    publish(tmp_path / "reg", tmp_path, "m")
    events = feature_events(40)
    poisoned = events[30].open_time
    real = OncePerCandle.publish_many

    async def publish_many(self, batch, *key):
        if self.topic == topics.PREDICTIONS and any(e.model == "m" and e.open_time == poisoned for e in batch):
            raise rex.ResponseError("ERR Error running script: user_script:9: value too large")
        return await real(self, batch, *key)

    monkeypatch.setattr(OncePerCandle, "publish_many", publish_many)
    before = metric("poison_events_total", worker="outbox:predictions")
    rt = runtime(redis_url, tmp_path)
    await rt.start(http=False)
    try:
        await add_events(redis_url, events)

        async def all_but_the_poisoned() -> bool:
            got = [e["open_time"] for e in await read_topic(redis_url, topics.PREDICTIONS) if e["model"] == "m"]
            return got[-1:] == [events[-1].open_time]

        await poll(all_but_the_poisoned, timeout=30)
        await poll(lambda: _count(redis_url, topics.PREDICTIONS, 1), timeout=30)
        got = [e["open_time"] for e in await read_topic(redis_url, topics.PREDICTIONS) if e["model"] == "m"]
        (letter,) = await letters(redis_url, topics.PREDICTIONS)
        ready = rt.health.status()[0]
    finally:
        await rt.stop()
    assert got == [e.open_time for e in events[FIRST:] if e.open_time != poisoned]
    assert "value too large" in letter.reason and str(poisoned) in letter.payload
    assert metric("poison_events_total", worker="outbox:predictions") == before + 1
    assert ready
