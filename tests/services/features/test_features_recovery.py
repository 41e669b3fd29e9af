"""Features restarts that the bus edge rewrite made safe: a pending entry sitting before
acknowledged ones (checkpoint replay in stream order), and a history source that keeps failing
(bounded warm-up retries, then a live warm-up: the stream never waits on it for good)."""

from __future__ import annotations

import numpy as np
import pytest
import redis.asyncio as aioredis

from klinebus.pipeline import build_runtime
from libs.common import topics
from libs.common.bus import OncePerCandle
from libs.common.contracts import FeaturesEvent, KlineEvent
from libs.common.klines import read_kline_csv
from libs.indicators.batch import compute_batch
from libs.indicators.feature_sets import get_feature_set
from services.features import component as features_component, history as features_history
from tests.candles import BTC_15M
from tests.streams import add_events, read_topic, wait_for_events

SET = "skeleton-v1"


def candles(n: int):
    return read_kline_csv(BTC_15M, "BTCUSDT", "15m")[:n]


async def test_replay_applies_a_pending_entry_left_before_acknowledged_ones(redis_url, tmp_path):
    ks = candles(40)
    key = topics.stream_key(topics.KLINES)
    client = aioredis.Redis.from_url(redis_url)
    try:
        await add_events(redis_url, [KlineEvent.from_kline(k) for k in ks[:30]])
        await client.xgroup_create(key, "features", id="0")
        entries = (await client.xreadgroup("features", "old-pod", {key: ">"}, count=100))[0][1]
        # An older build acknowledged 13..29 although 12 failed: 12 is pending before them.
        await client.xack(key, "features", *[e[0] for i, e in enumerate(entries) if i != 12])
        guard = OncePerCandle(client, topics.FEATURES, 1000)
        await guard.publish_many([
            FeaturesEvent(symbol="BTCUSDT", interval="15m", open_time=k.open_time, close=k.close,
                          feature_set=SET, values={}, warm=False)
            for i, k in enumerate(ks[:30]) if i != 12
        ])
    finally:
        await client.aclose()
    runtime = build_runtime("features", redis_url, tmp_path, feature_set=SET, warmup_source="none")
    await runtime.start(http=False)
    try:
        await add_events(redis_url, [KlineEvent.from_kline(k) for k in ks[30:]])
        got = await wait_for_events(redis_url, topics.FEATURES, 39)
        client = aioredis.Redis.from_url(redis_url)
        assert (await client.xpending(key, "features"))["pending"] == 0
        await client.aclose()
    finally:
        await runtime.stop()
    live = [e for e in got if e["open_time"] >= ks[30].open_time]
    assert [e["open_time"] for e in live] == [k.open_time for k in ks[30:]]
    names = list(get_feature_set(SET).features)
    cols = [np.array([getattr(k, f) for k in ks]) for f in ("open", "high", "low", "close", "volume")]
    ref = compute_batch(*cols, names=names)
    for i, e in enumerate(live, start=30):  # the state holds candle 12: SMA-20 at 30 covers it
        assert e["warm"]
        for name in names:
            assert e["values"][name] == pytest.approx(ref[name][i], rel=1e-9, abs=1e-9), (i, name)


async def test_a_history_source_that_keeps_failing_is_given_up_and_the_key_warms_up_live(
    redis_url, tmp_path, monkeypatch
):
    monkeypatch.setattr(features_component, "WARMUP_RETRY_S", 0.01)
    blocked = tmp_path / "archive-is-a-file"
    blocked.write_text("not a folder: every read fails like an object store answering 403")
    ks = candles(30)
    runtime = build_runtime("features", redis_url, tmp_path, feature_set=SET, archive_url=str(blocked))
    failures = runtime.metrics.counter("warmup_failures_total", "", ["interval"]).labels("15m")
    before = failures._value.get()
    await runtime.start(http=False)
    try:
        await add_events(redis_url, [KlineEvent.from_kline(k) for k in ks])
        got = await wait_for_events(redis_url, topics.FEATURES, 30)
    finally:
        await runtime.stop()
    assert [e["open_time"] for e in got] == [k.open_time for k in ks]
    assert [e["warm"] for e in got] == [False] * 19 + [True] * 11  # warmed up live
    assert failures._value.get() - before == 1
    assert await read_topic(redis_url, topics.DEAD_LETTERS) == []


@pytest.mark.parametrize("error, tries", [(PermissionError("403 Forbidden"), 1), (ConnectionError("reset by peer"), 3)])
async def test_a_permanent_history_error_is_not_retried_a_transient_one_is(redis_url, tmp_path, monkeypatch, error, tries):
    monkeypatch.setattr(features_component, "WARMUP_RETRY_S", 0.01)
    calls = []

    def failing_read(*args, **kwargs):
        calls.append(args[1:3])
        raise error

    monkeypatch.setattr(features_history, "read_archive", failing_read)
    ks = candles(25)
    runtime = build_runtime("features", redis_url, tmp_path, feature_set=SET)
    await runtime.start(http=False)
    try:
        await add_events(redis_url, [KlineEvent.from_kline(k) for k in ks])
        got = await wait_for_events(redis_url, topics.FEATURES, 25)
    finally:
        await runtime.stop()
    assert [e["open_time"] for e in got] == [k.open_time for k in ks]  # warmed up live, nothing lost
    assert calls == [("BTCUSDT", "15m")] * tries
