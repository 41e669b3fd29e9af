"""Chart-classifier inference micro-batched (issue 23 item 4): many charts in one onnxruntime call
answer exactly what each chart answers alone; a chart that cannot be fed fails alone; the
``ChartBatcher`` gathers concurrent callers into shared calls; ``ChartServing.on_charts`` (a
``bus.ordered_batch`` delivery) publishes what ``on_chart`` publishes, in order."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from libs.common.artefacts import ArtefactRoot
from services.inference.batching import ChartBatcher, Job
from services.inference.chart_models import ChartImageError, load_chart_package
from services.inference.charts import ChartServing, load_chart_model
from tests.candles import load
from tests.services.inference.test_chart_serving import chart, classifier, kline  # noqa: F401 - the fixture
from tests.services.trainer.classifier.conftest import BTC_15M

pytestmark = pytest.mark.slow  # renders ~120 charts and trains a tiny model (about half a minute on 2 cores)


@pytest.fixture(scope="module")
def model_and_charts(classifier):  # noqa: F811
    ds, _, pkg, index = classifier
    model = load_chart_model(load_chart_package(pkg.uri, None, Path(pkg.uri).parent), 1)
    c = load(BTC_15M)
    pos = {int(t): i for i, t in enumerate(c.open_time)}
    rows = index.tail(6).reset_index(drop=True)
    charts = []
    for _, r in rows.iterrows():
        i = pos[int(r["open_time"])]
        candle = (float(c.open[i]), float(c.high[i]), float(c.low[i]), float(c.close[i]), float(c.volume[i]))
        charts.append(((ds / r["image_path"]).read_bytes(), candle, str(r["image_path"])))
    return model, charts, rows


def same(a, b) -> None:
    assert [a.probabilities[k] for k in a.probabilities] == pytest.approx([b.probabilities[k] for k in b.probabilities], abs=1e-5)
    assert a.next_close == pytest.approx(b.next_close, rel=1e-6)
    assert (a.predicted_class, a.text) == (b.predicted_class, b.text)


def test_a_batch_answers_what_each_chart_answers_alone(model_and_charts):
    model, charts, _ = model_and_charts
    alone = [model.predict(*c) for c in charts]
    calls = []
    real = model.session

    class Counting:
        def run(self, names, feed):
            calls.append(len(feed["image"]))
            return real.run(names, feed)

    model.session = Counting()
    try:
        batch = model.predict_many(charts)
    finally:
        model.session = real
    assert calls == [len(charts)]  # one onnxruntime call for all of them
    assert len(batch) == len(charts)
    for a, b in zip(batch, alone):
        same(a, b)


def test_a_chart_that_cannot_be_fed_fails_alone(model_and_charts):
    model, charts, _ = model_and_charts
    mixed = [charts[0], (b"\x89PNG\r\n\x1a\n torn", charts[1][1], "torn.png"), charts[2]]
    out = model.predict_many(mixed)
    assert isinstance(out[1], ChartImageError) and "not a readable image" in str(out[1])
    same(out[0], model.predict(*charts[0]))
    same(out[2], model.predict(*charts[2]))


async def test_the_chart_batcher_shares_calls_between_callers_and_keeps_each_callers_order(model_and_charts):
    model, charts, _ = model_and_charts
    sessions: list[int] = []
    batcher = ChartBatcher("t", max_batch=4, max_wait_s=0.05, on_session=lambda jobs: sessions.append(len(jobs)))

    def jobs(items):
        return [Job(model=model, symbol="BTCUSDT", interval="15m", open_time=i, window=png, last_close=c[3],
                    meta={"candle": c, "where": w}) for i, (png, c, w) in enumerate(items)]

    try:
        first, second = await asyncio.gather(batcher.answer(jobs(charts[:3])), batcher.answer(jobs(charts[3:])))
    finally:
        await batcher.stop()
    for a, c in zip(first + second, charts):
        same(a, model.predict(*c))
    assert sum(sessions) == len(charts) and max(sessions) <= 4 and len(sessions) < len(charts)


async def test_on_charts_publishes_what_on_chart_publishes(redis_url, model_and_charts, classifier):  # noqa: F811
    from tests.streams import add_events

    model, charts, rows = model_and_charts
    ds = classifier[0]
    c = load(BTC_15M)
    pos = {int(t): i for i, t in enumerate(c.open_time)}
    await add_events(redis_url, [kline(pos[int(r["open_time"])]) for _, r in rows.iterrows()])
    events = [chart(r, str(ds / r["image_path"])) for _, r in rows.iterrows()]
    events.insert(2, events[2].model_copy(update={"uri": str(ds / "missing.png")}))  # unreadable: refused alone
    # A torn PNG earlier in the delivery is refused by the session, after the unreadable one is
    # refused while preparing: the dead letters must still come out in stream order.
    torn = ds / "torn-for-order.png"
    torn.write_bytes(b"\x89PNG\r\n\x1a\n torn")
    events.insert(1, events[1].model_copy(update={"uri": str(torn)}))

    def serving():
        counter = lambda *a, **k: SimpleNamespace(labels=lambda *a: SimpleNamespace(inc=lambda *a: None, set=lambda *a: None))  # noqa: E731
        m = SimpleNamespace(model_errors=counter(), predictions=counter(), last_prediction=counter())
        engine = SimpleNamespace(m=m, scorer=SimpleNamespace(add_forecast=lambda *a, **k: []), _emit_score=lambda s: None)
        published, letters = [], []

        async def publish(events, *key):
            published.extend(events)

        async def dead_letter(topic, data, reason):
            letters.append(reason)

        from libs.common.bus import redis_client

        s = ChartServing(engine, redis_client(redis_url), publish, dead_letter, SimpleNamespace(counter=counter),
                         artefacts=ArtefactRoot(str(ds)), max_batch=4)
        s.models[model.spec.name] = model
        return s, published, letters

    one, one_pub, one_dead = serving()
    for e in events:
        await one.on_chart(e)
    many, many_pub, many_dead = serving()
    try:
        await many.on_charts(events)
    finally:
        await many.stop()
    assert [p.open_time for p in many_pub] == [p.open_time for p in one_pub] == [int(r["open_time"]) for _, r in rows.iterrows()]
    for a, b in zip(many_pub, one_pub):
        assert a.predicted["close"] == pytest.approx(b.predicted["close"], rel=1e-6)
        assert a.predicted["class"] == b.predicted["class"]
        assert list(a.probabilities.values()) == pytest.approx(list(b.probabilities.values()), abs=1e-5)
    assert len(one_dead) == 2 and "torn-for-order.png" in one_dead[0] and "missing.png" in one_dead[1]
    assert many_dead == one_dead
    assert np.isfinite([p.predicted["close"] for p in many_pub]).all()
