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


async def test_two_archivers_and_a_history_import_racing_on_one_month_keep_every_row(redis_url, tmp_path):
    """Two archiver replicas share klines.v1 while a history import writes the same month: with the
    month file rewritten per write, the last writer won and rows vanished; with parts none do."""
    import threading

    from libs.common.archive import ParquetArchive

    (ks,) = shipped_candles(400, symbols=("SOLUSDT",)).values()
    live, history = ks[150:], ks[:250]  # 100 candles come both ways

    class _Sim:
        ws_url, rest_url, candles = "ws://127.0.0.1:1", "http://127.0.0.1:1", {("SOLUSDT", "1m"): ks}

    producer = Bus("test-producer", redis_url, consumer="p")
    producer.publisher(topics.KLINES, KlineEvent)
    await producer.broker.start()
    runtimes = [
        create_archiver(ingest_settings(_Sim, tmp_path, consumer_name=f"archiver-{i}"), redis_url) for i in range(2)
    ]
    root = ingest_settings(_Sim, tmp_path).archive_root()

    def history_import() -> None:
        archive = ParquetArchive(root)
        for i in range(0, len(history), 10):
            archive.write(history[i : i + 10])

    importer = threading.Thread(target=history_import)
    try:
        async with running(runtimes[0]), running(runtimes[1]):
            importer.start()
            for i in range(0, len(live), 5):  # small batches, as candles close
                for k in live[i : i + 5]:
                    await producer.publish(KlineEvent.from_kline(k, "ws"))
                await asyncio.sleep(0)
            await asyncio.to_thread(importer.join, 60)
            deadline = asyncio.get_running_loop().time() + 60
            while len(read_archive(root, "SOLUSDT", "1m")) < len(ks):
                assert asyncio.get_running_loop().time() < deadline, len(read_archive(root, "SOLUSDT", "1m"))
                await asyncio.sleep(0.1)
    finally:
        await producer.broker.stop()
    frame = read_archive(root, "SOLUSDT", "1m")
    assert list(frame["open_time"]) == [k.open_time for k in ks]
    assert list(frame["close"]) == [k.close for k in ks]
