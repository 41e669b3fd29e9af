"""The Parquet archive: partitioning, idempotent re-delivery, atomic replace, reading back; and the
archiver consuming klines.v1 on a real Redis."""

from __future__ import annotations

import asyncio
import datetime as dt

from libs.common.bus import Bus
from libs.common import topics
from libs.common.contracts import KlineEvent
from services.ingest.archive import ParquetArchive, read_archive
from services.ingest.archive_app import create as create_archiver

from ingest_support import ingest_settings, running, shipped_candles


def _ms(y, m, d, h=0, mi=0):
    return int(dt.datetime(y, m, d, h, mi, tzinfo=dt.timezone.utc).timestamp() * 1000)


def test_write_partitions_by_month_and_is_idempotent(tmp_path):
    from dataclasses import replace

    (ks,) = shipped_candles(5, symbols=("BTCUSDT",)).values()
    # two candles moved across a month boundary (2026-04-30 23:59 and 2026-05-01 00:00)
    edge = [replace(ks[0], open_time=_ms(2026, 4, 30, 23, 59), close_time=_ms(2026, 5, 1) - 1),
            replace(ks[1], open_time=_ms(2026, 5, 1), close_time=_ms(2026, 5, 1, 0, 1) - 1)]
    archive = ParquetArchive(str(tmp_path / "a"))
    assert archive.write(ks + edge) == 7
    assert archive.months("BTCUSDT", "1m") == ["2026-04", "2026-05"]
    assert archive.write(ks) == 0  # re-delivery: nothing new
    assert not list((tmp_path / "a").rglob("*.tmp-*"))
    frame = read_archive(str(tmp_path / "a"), "btcusdt", "1m")
    assert list(frame["open_time"]) == sorted(k.open_time for k in ks + edge)
    assert list(frame["close"][:5]) == [k.close for k in ks]
    window = read_archive(str(tmp_path / "a"), "BTCUSDT", "1m", start=ks[1].open_time, end=ks[3].open_time)
    assert list(window["open_time"]) == [k.open_time for k in ks[1:4]]
    assert read_archive(str(tmp_path / "a"), "ETHUSDT", "1m").empty


def test_any_fsspec_url(tmp_path):
    (ks,) = shipped_candles(3, symbols=("ETHUSDT",)).values()
    ParquetArchive("memory://klinebus-test").write(ks)
    assert list(read_archive("memory://klinebus-test", "ETHUSDT", "1m")["open_time"]) == [k.open_time for k in ks]


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
