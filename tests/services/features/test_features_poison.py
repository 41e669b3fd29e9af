"""A candle is judged alone (issue 21): a candle of a warm key whose numbers pass KlineEvent's rules
but would leave its indicators non-finite, sitting in the middle of a batch of every key's
candles, is a dead letter with its reason; every batch-mate is published once, and the key's
later values equal the batch computation over its clean candles.

Before the fix the engine took the batch, then found non-finite values and raised; the bus
retried the batch one candle at a time, every candle was a duplicate by then, and nothing of
the batch was published, for any key."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import orjson
import pytest
import redis.asyncio as aioredis

from klinebus.pipeline import build_runtime
from libs.common import topics
from libs.common.bus import DATA_FIELD
from libs.common.contracts import KlineEvent
from libs.common.klines import read_kline_csv
from libs.indicators.batch import compute_batch
from libs.indicators.feature_sets import get_feature_set
from tests.candles import BTC_15M
from tests.streams import read_topic, wait_for_events

SYMBOLS = ("AAAUSDT", "BBBUSDT", "CCCUSDT")
POISONED = "BBBUSDT"


@pytest.mark.parametrize("feature_set, numbers", [
    ("skeleton-v1", dict(open=1e308, high=1e308, low=1e308, close=1e308)),
    ("all-v1", dict(volume=1.7e308)),
])
async def test_a_non_finite_candle_mid_batch_is_a_dead_letter_and_its_batch_mates_are_published(
    redis_url, tmp_path, feature_set, numbers
):
    warm = get_feature_set(feature_set).warmup_candles + 2
    n = warm + 10
    base = read_kline_csv(BTC_15M, "BTCUSDT", "15m")[:n]
    series = {s: [KlineEvent.from_kline(replace(k, symbol=s)) for k in base] for s in SYMBOLS}
    bad_at = warm + 3  # the key is warm by then
    payloads = []
    for i in range(n):  # in time order, the symbols interleaved: one batch holds them all
        for s in SYMBOLS:
            e = series[s][i]
            payloads.append(orjson.dumps({**e.model_dump(), **numbers}) if (s, i) == (POISONED, bad_at) else e.to_json())
    client = aioredis.Redis.from_url(redis_url)
    try:
        for p in payloads:
            await client.xadd(topics.stream_key(topics.KLINES), {DATA_FIELD: p})
    finally:
        await client.aclose()
    runtime = build_runtime("features", redis_url, tmp_path, feature_set=feature_set, warmup_source="none")
    await runtime.start(http=False)
    try:
        got = await wait_for_events(redis_url, topics.FEATURES, len(payloads) - 1, timeout=30, strict=False)
        letters = await read_topic(redis_url, topics.DEAD_LETTERS)
    finally:
        await runtime.stop()

    for s in SYMBOLS:
        clean = [e for i, e in enumerate(series[s]) if (s, i) != (POISONED, bad_at)]
        mine = [e for e in got if e["symbol"] == s]
        assert [e["open_time"] for e in mine] == [e.open_time for e in clean], s
    assert len(letters) == 1, letters
    assert letters[0]["service"] == "features" and letters[0]["source"] == topics.KLINES
    assert str(series[POISONED][bad_at].open_time) in letters[0]["reason"]
    assert "beyond what a Binance kline can carry" in letters[0]["reason"]
    # the key's state was never touched by it: its later values equal batch over its clean candles
    clean = [e for i, e in enumerate(series[POISONED]) if i != bad_at]
    cols = [np.array([getattr(e, f) for e in clean]) for f in ("open", "high", "low", "close", "volume")]
    names = list(get_feature_set(feature_set).features)
    ref = compute_batch(*cols, names=names)
    mine = [e for e in got if e["symbol"] == POISONED]
    for i, e in enumerate(mine):
        if i >= warm:
            assert e["warm"]
            for name in names:
                assert e["values"][name] == pytest.approx(ref[name][i], rel=1e-9, abs=1e-9), (name, i)
