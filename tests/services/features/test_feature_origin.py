"""Every features.v1 event says where its key's indicator state started (``feature_origin``: the
open time of the first candle folded into it). OBV and VPT are cumulative, so the same candle
gives another value from another origin; inference refuses a window whose origin differs from
the one a model was trained from.

The expected origins are open times read from the candle file, never from the service."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import orjson
import pytest
import redis.asyncio as aioredis

from klinebus.pipeline import build_runtime
from libs.common import topics
from libs.common.archive import ParquetArchive
from libs.common.contracts import KlineEvent
from libs.common.klines import read_kline_csv
from libs.indicators.batch import compute_batch
from services.features.position import Checkpoint
from services.features.state import FeaturesState
from tests.candles import BTC_15M
from tests.streams import add_events, wait_for_events

NOW = 1_700_000_000_000
SET = "skeleton-v1"
KEY = ("BTCUSDT", "15m")


def klines(symbol: str = "BTCUSDT", n: int = 120):
    return [replace(k, symbol=symbol) for k in read_kline_csv(BTC_15M, "BTCUSDT", "15m")[:n]]


def events(ks) -> list[KlineEvent]:
    return [KlineEvent.from_kline(k) for k in ks]


def cols(ks) -> tuple:
    return tuple(np.array([getattr(k, c) for k in ks], dtype=np.int64 if c == "open_time" else np.float64)
                 for c in ("open_time", "open", "high", "low", "close", "volume"))


def published(applied) -> list[dict]:
    return [orjson.loads(p.payload) for p in applied.publish]


# --- the state machine --------------------------------------------------------------------------


def test_a_key_warming_up_live_has_its_first_live_candle_as_origin_on_every_event():
    state = FeaturesState(SET, "continue", warms_up=False)
    a, b = klines("AAAUSDT", 40), klines("BBBUSDT", 40)
    got = published(state.apply(events(a[:3]), NOW)) + published(state.apply(events(a[3:] + b[7:]), NOW))
    by = {s: [e["feature_origin"] for e in got if e["symbol"] == s] for s in ("AAAUSDT", "BBBUSDT")}
    assert by["AAAUSDT"] == [a[0].open_time] * 40  # warming (warm: false) events carry it too
    assert by["BBBUSDT"] == [b[7].open_time] * 33


def test_a_key_warmed_from_history_has_the_first_history_candle_as_origin():
    state = FeaturesState(SET, "continue", warms_up=True)
    ks = klines(n=60)
    assert state.warm(KEY, cols(ks[5:50])) == 45
    got = published(state.apply(events(ks[50:]), NOW))
    assert [e["feature_origin"] for e in got] == [ks[5].open_time] * 10
    assert all(e["warm"] for e in got)


@pytest.mark.parametrize("policy", ["continue", "reset"])
def test_a_gap_restarts_the_origin_only_under_the_reset_policy(policy):
    state = FeaturesState(SET, policy, warms_up=False)
    ks = klines(n=60)
    holed = ks[:30] + ks[33:]  # three candles never came
    got = published(state.apply(events(holed), NOW))
    after = ks[33].open_time if policy == "reset" else ks[0].open_time
    assert [e["feature_origin"] for e in got] == [ks[0].open_time] * 30 + [after] * 27
    if policy == "reset":  # the state restarted there: warming again
        assert [e["warm"] for e in got[30:]] == [False] * 19 + [True] * 8


def test_the_origin_travels_in_the_checkpoint_and_a_waiting_key_is_rebuilt_from_its_new_history():
    state = FeaturesState(SET, "continue", warms_up=True)
    old, new = klines("OLDUSDT", 40), klines("NEWUSDT", 40)
    state.warm(("OLDUSDT", "15m"), cols(old[2:30]))
    state.warm(("NEWUSDT", "15m"), cols(new[:30]))
    state.apply(events([old[30], new[30]]), NOW)
    state.handled("2-0")
    saved = state.snapshot()
    assert saved.origins == {("OLDUSDT", "15m"): old[2].open_time, ("NEWUSDT", "15m"): new[0].open_time}

    restarted = FeaturesState(SET, "continue", warms_up=True)
    restarted.restore(saved, {("NEWUSDT", "15m"): "2-0"})  # NEW was still waiting: dropped, rebuilt
    assert restarted.origins == {("OLDUSDT", "15m"): old[2].open_time}
    restarted.warm(("NEWUSDT", "15m"), cols(new[10:30]))  # its history now starts later
    got = published(restarted.apply(events([old[31], new[31]]), NOW))
    assert [(e["symbol"], e["feature_origin"]) for e in got] == [
        ("OLDUSDT", old[2].open_time), ("NEWUSDT", new[10].open_time)]


def test_a_checkpoint_without_origins_publishes_none_and_says_so_once(caplog):
    state = FeaturesState(SET, "continue", warms_up=False)
    a, b = klines("AAAUSDT", 40), klines("BBBUSDT", 40)
    state.apply(events(a[:20] + b[:20]), NOW)
    saved = state.snapshot()
    older_build = Checkpoint(saved.snapshot, saved.entry_id)  # what a build before origins wrote

    restarted = FeaturesState(SET, "continue", warms_up=False)
    with caplog.at_level(logging.WARNING, logger="klinebus.features"):
        restarted.restore(older_build, {})
        got = published(restarted.apply(events(a[20:30] + b[20:30]), NOW))
        got += published(restarted.apply(events(a[30:] + b[30:]), NOW))
    assert [e["feature_origin"] for e in got] == [None] * 40
    lines = [r for r in caplog.records if "no feature origin" in r.getMessage()]
    assert len(lines) == 1 and "2 of 2 keys" in lines[0].getMessage()
    # A fresh key is known from its first candle, whatever the checkpoint lacked.
    c = klines("CCCUSDT", 3)
    assert [e["feature_origin"] for e in published(restarted.apply(events(c), NOW))] == [c[0].open_time] * 3


def test_a_failed_apply_puts_the_origin_back(monkeypatch):
    from services.features import applying

    state = FeaturesState(SET, "continue", warms_up=False)
    ks = klines(n=10)

    def broken(*args, **kwargs):
        raise RuntimeError("a bug while building events")

    with monkeypatch.context() as m:
        m.setattr(applying.FeaturesEvent, "prepared", broken)
        with pytest.raises(RuntimeError):
            state.apply(events(ks[:5]), NOW)
    assert state.origins == {}
    assert [e["feature_origin"] for e in published(state.apply(events(ks[:5]), NOW))] == [ks[0].open_time] * 5


# --- the service on a real Redis, through a checkpoint restore -----------------------------------


async def test_the_service_publishes_the_archive_origin_and_keeps_it_across_a_restart(redis_url, tmp_path):
    ks = klines(n=360)
    archive_first = 40  # the archive starts later than the file: the origin is the archive's first candle
    ParquetArchive(str(tmp_path / "archive")).write(ks[archive_first:300])
    first = build_runtime("features", redis_url, tmp_path, feature_set="all-v1")
    await first.start(http=False)
    try:
        await add_events(redis_url, events(ks[300:330]))
        await wait_for_events(redis_url, topics.FEATURES, 30)
    finally:
        await first.stop()  # writes the final checkpoint
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert await client.hexists(topics.stream_companion_key(topics.FEATURES, "engine-state"), "origins")
    finally:
        await client.aclose()

    second = build_runtime("features", redis_url, tmp_path, feature_set="all-v1")
    await second.start(http=False)
    try:
        await add_events(redis_url, events(ks[330:]))
        got = await wait_for_events(redis_url, topics.FEATURES, 60)
    finally:
        await second.stop()
    assert [e["open_time"] for e in got] == [k.open_time for k in ks[300:]]
    assert [e["feature_origin"] for e in got] == [ks[archive_first].open_time] * 60
    assert all(e["warm"] for e in got)
    # ...and the values are those of a computation that started there (OBV is cumulative).
    c = [np.array([getattr(k, f) for k in ks[archive_first:]]) for f in ("open", "high", "low", "close", "volume")]
    obv = compute_batch(*c, names=["obv"])["obv"]
    assert [e["values"]["obv"] for e in got] == pytest.approx(list(obv[300 - archive_first:]), rel=1e-12, abs=1e-9)


async def test_a_checkpoint_written_before_origins_restores_with_origin_unknown(redis_url, tmp_path, caplog):
    ks = klines(n=60)
    first = build_runtime("features", redis_url, tmp_path, feature_set=SET, warmup_source="none")
    await first.start(http=False)
    try:
        await add_events(redis_url, events(ks[:30]))
        await wait_for_events(redis_url, topics.FEATURES, 30)
    finally:
        await first.stop()
    client = aioredis.Redis.from_url(redis_url)
    try:  # what an older build left: the snapshot and its position, no origins
        assert await client.hdel(topics.stream_companion_key(topics.FEATURES, "engine-state"), "origins") == 1
    finally:
        await client.aclose()

    second = build_runtime("features", redis_url, tmp_path, feature_set=SET, warmup_source="none")
    with caplog.at_level(logging.WARNING, logger="klinebus.features"):
        await second.start(http=False)
        try:
            await add_events(redis_url, events(ks[30:]))
            got = await wait_for_events(redis_url, topics.FEATURES, 60)
        finally:
            await second.stop()
    assert [e["feature_origin"] for e in got] == [ks[0].open_time] * 30 + [None] * 30
    assert len([r for r in caplog.records if "no feature origin" in r.getMessage()]) == 1
