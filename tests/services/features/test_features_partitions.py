"""Partitioned klines.v1 (issue 23): each partition's indicator state, checkpoint and waiting
records are its own, so a partition moves from one features replica to another mid-stream (and
back), and features.v1 still holds exactly one event per candle, with the values (and feature
origin) of a computation that never stopped. Expected values come from the batch kernels over the candle file."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import numpy as np
import pytest

from klinebus.pipeline import build_runtime
from libs.common import topics
from libs.common.bus import DATA_FIELD, redis_client
from libs.common.contracts import KlineEvent
from libs.common.klines import read_kline_csv
from libs.indicators.batch import compute_batch
from libs.indicators.feature_sets import get_feature_set
from tests.candles import BTC_15M
from tests.streams import wait_for_events

SET = "skeleton-v1"
P = 2
SYMBOLS = ("AAAUSDT", "BBBUSDT", "CCCUSDT", "DDDUSDT")  # keys in every partition, with 2 or 4
BEFORE, AFTER, BACK = 40, 30, 10  # candles per key before the move, after it, after the move back
DEADLINE_S = 60.0


def klines(symbol: str):
    return [replace(k, symbol=symbol) for k in read_kline_csv(BTC_15M, "BTCUSDT", "15m")[: BEFORE + AFTER + BACK]]


async def add_routed(url: str, events: list[KlineEvent], partitions: int = P) -> None:
    """XADD each candle to its key's partition of klines.v1, as ingest publishes."""
    client = redis_client(url)
    try:
        for e in events:
            key = topics.stream_key(topics.KLINES, topics.partition_of(e.symbol, e.interval, partitions))
            await client.xadd(key, {DATA_FIELD: e.to_json()})
    finally:
        await client.aclose()


async def until(cond, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {DEADLINE_S:.0f}s: {what}")
        await asyncio.sleep(0.05)


def restored(runtime) -> bool:
    return runtime.health._checks["state_restored"]()


@pytest.mark.parametrize("partitions", [2, 4])
async def test_a_partition_moving_to_another_replica_mid_stream_keeps_one_event_per_candle(redis_url, tmp_path, partitions):
    every = set(range(partitions))
    assert {topics.partition_of(s, "15m", partitions) for s in SYMBOLS} == every  # each partition has keys
    series = {s: klines(s) for s in SYMBOLS}
    kw = dict(feature_set=SET, warmup_source="none", partitions=partitions)
    a = build_runtime("features", redis_url, tmp_path / "a", consumer="a", **kw)
    b = build_runtime("features", redis_url, tmp_path / "b", consumer="b", **kw)

    async def add(lo: int, hi: int) -> None:
        await add_routed(redis_url, [KlineEvent.from_kline(series[s][i]) for i in range(lo, hi) for s in SYMBOLS],
                         partitions)

    await a.start(http=False)
    try:
        await until(lambda: a.bus.owned_partitions() == every and restored(a), "a owns every partition")
        await add(0, BEFORE)
        await wait_for_events(redis_url, topics.FEATURES, BEFORE * len(SYMBOLS), settle=0)
        await b.start(http=False)
        try:
            half = partitions // 2
            await until(lambda: len(b.bus.owned_partitions()) == half and len(a.bus.owned_partitions()) == half
                        and restored(a) and restored(b), "half the partitions moved to b")
            moved = set(b.bus.owned_partitions())
            client = redis_client(redis_url)
            try:  # a handed each over with a checkpoint at its last candle, b restored from it
                for m in moved:
                    last = (await client.xrevrange(topics.stream_key(topics.KLINES, m), count=1))[0][0]
                    saved = await client.hget(topics.stream_companion_key(topics.FEATURES, "engine-state", m),
                                              "entry_id")
                    assert saved == last, m
            finally:
                await client.aclose()
            await add(BEFORE, BEFORE + AFTER)
            await wait_for_events(redis_url, topics.FEATURES, (BEFORE + AFTER) * len(SYMBOLS), settle=0)
        finally:
            await b.stop()  # gives its partitions up cleanly: they move back to a
        await until(lambda: a.bus.owned_partitions() == every and restored(a), "the partitions moved back to a")
        await add(BEFORE + AFTER, BEFORE + AFTER + BACK)
        got = await wait_for_events(redis_url, topics.FEATURES, (BEFORE + AFTER + BACK) * len(SYMBOLS))
    finally:
        await a.stop()
    names = get_feature_set(SET).features
    for s in SYMBOLS:
        mine = [e for e in got if e["symbol"] == s]
        ks = series[s]
        assert [e["open_time"] for e in mine] == [k.open_time for k in ks], s  # one per candle, in order
        assert {e["feature_origin"] for e in mine} == {ks[0].open_time}
        cols = [np.array([getattr(k, f) for k in ks]) for f in ("open", "high", "low", "close", "volume")]
        ref = compute_batch(*cols, names=list(names))
        for i, e in enumerate(mine):
            if not e["warm"]:
                continue
            for name in names:
                assert e["values"][name] == pytest.approx(ref[name][i], rel=1e-9, abs=1e-9), (s, i, name)
        assert sum(e["warm"] for e in mine) == len(ks) - (get_feature_set(SET).warmup_candles - 1)
    client = redis_client(redis_url)
    try:  # each partition's checkpoint sits in its own slot
        for p in every:
            assert await client.exists(topics.stream_companion_key(topics.FEATURES, "engine-state", p))
    finally:
        await client.aclose()


async def test_a_stream_warm_up_reads_the_history_of_its_keys_partition(redis_url, tmp_path):
    """The history source itself: through the service, a group created after these candles replays
    them into the state before any warm-up, so it would not show which stream history came from."""
    from services.features import history
    from services.features.settings import FeaturesSettings

    ks = {s: klines(s)[:40] for s in ("AAAUSDT", "BBBUSDT")}  # partition 1 and partition 0
    assert [topics.partition_of(s, "15m", P) for s in ks] == [1, 0]
    await add_routed(redis_url, [KlineEvent.from_kline(k) for i in range(40) for k in (ks["AAAUSDT"][i], ks["BBBUSDT"][i])])
    settings = FeaturesSettings(data_dir=tmp_path, redis_url=redis_url, warmup_source="stream", partitions=P)
    client = redis_client(redis_url)
    try:
        read = history.source(settings, client)
        for s, candles in ks.items():
            cols = await read(s, "15m", candles[30].open_time)
            assert cols[0].tolist() == [k.open_time for k in candles[:30]], s
            assert cols[4].tolist() == [k.close for k in candles[:30]], s
    finally:
        await client.aclose()
