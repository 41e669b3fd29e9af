"""The archiver consuming klines.v1 on a real Redis into the Parquet archive."""

from __future__ import annotations

import asyncio
import datetime as dt

from libs.common.bus import Bus
from libs.common import topics
from libs.common.contracts import KlineEvent
from libs.common.archive import read_archive
from services.ingest.archive_app import create as create_archiver

from ingest_support import ingest_settings, running, shipped_candles


def _ms(y, m, d, h=0, mi=0):
    return int(dt.datetime(y, m, d, h, mi, tzinfo=dt.timezone.utc).timestamp() * 1000)


async def test_archiver_consumes_klines_once_each_even_when_redelivered(redis_url, tmp_path):
    (ks,) = shipped_candles(6, symbols=("SOLUSDT",)).values()

    class _Sim:  # settings only need URLs and the stream list
        ws_url, rest_url, candles = "ws://127.0.0.1:1", "http://127.0.0.1:1", {("SOLUSDT", "1m"): ks}

    settings = ingest_settings(_Sim, tmp_path)
    producer = Bus("test-producer", redis_url, consumer="p")
    producer.publisher(topics.KLINES, KlineEvent)
    await producer.broker.start()
    try:
        for k in ks + ks[:2]:  # the first two delivered twice
            await producer.publish(KlineEvent.from_kline(k, "ws"))
        runtime = create_archiver(settings, redis_url)
        async with running(runtime):
            for _ in range(100):
                frame = read_archive(settings.archive_root(), "SOLUSDT", "1m")
                if len(frame) == len(ks):
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
    finally:
        await producer.broker.stop()
    frame = read_archive(settings.archive_root(), "SOLUSDT", "1m")
    assert list(frame["open_time"]) == [k.open_time for k in ks]
    assert list(frame["volume"]) == [k.volume for k in ks]
