"""features.v1 payloads written from the per-feature-set template (``applying._Writer``) are the
bytes the contract writes (``FeaturesEvent.prepared``) for every event of a batch, warm or not,
with an origin or without: the service checks only the first event of each batch at run time."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import orjson

from libs.common.contracts import FeaturesEvent, KlineEvent
from libs.common.klines import read_kline_csv
from libs.indicators.feature_sets import get_feature_set
from libs.indicators.kernels import ST_OK, ST_WARMING
from libs.indicators.streaming import StreamingEngine
from services.features import applying
from tests.candles import BTC_15M

NOW = 1_700_000_000_000


def series(symbol: str, n: int) -> list[KlineEvent]:
    return [KlineEvent.from_kline(replace(k, symbol=symbol)) for k in read_kline_csv(BTC_15M, "BTCUSDT", "15m")[:n]]


def test_every_event_of_a_batch_is_the_contracts_bytes_warm_cold_with_and_without_origin():
    engine = StreamingEngine("all-v1")
    w = get_feature_set("all-v1").warmup_candles
    a, b = series("AAAUSDT", w + 20), series("BBBUSDT", 10)
    origins: dict = {}
    applying.apply(engine, a[:w], NOW, origins)  # AAA warm from here on, BBB new
    origins[("AAAUSDT", "15m")] = None  # an origin not known (state restored from before origins)
    batch = [e for pair in zip(a[w:w + 10], b) for e in pair]
    out = applying.apply(engine, batch, NOW, origins)
    assert len(out.publish) == len(batch)
    docs = [orjson.loads(p.payload) for p in out.publish]
    assert {d["warm"] for d in docs} == {True, False}  # both template variants written
    assert {d["feature_origin"] is None for d in docs} == {True, False}
    for p, e in zip(out.publish, batch):
        expected = FeaturesEvent.model_validate_json(p.payload)
        assert p.payload == expected.to_json()  # the contract's own serialiser writes the same bytes
        assert (expected.symbol, expected.open_time, expected.close, expected.kline_ingested_at) == (
            e.symbol, e.open_time, e.close, e.ingested_at)


def test_writer_event_equals_prepared_for_each_variant():
    names = ("sma_20", "rsi_14", "weird%name")
    writer = applying._Writer("x-v1", names)
    row = np.array([[1.5, 0.1 + 0.2, 1e16]])
    values = writer.rows(row, np.array([ST_OK]))[0]
    cold = writer.rows(row, np.array([ST_WARMING]))[0]
    e = series("AAAUSDT", 1)[0]
    for warm, vals in ((True, values), (False, cold)):
        for origin in (e.open_time, None):
            got = writer.event(e, vals, warm, NOW, origin).payload
            want = FeaturesEvent.prepared(e.symbol, e.interval, e.open_time, e.close, "x-v1",
                                          dict(zip(names, row[0].tolist())) if warm else {}, warm,
                                          e.ingested_at, NOW, origin).payload
            assert got == want
