"""The Parquet archive: partitioning, idempotent re-delivery, append-only parts that concurrent writers
cannot lose, compaction, reading back, and errors classified permanent or transient."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np

from libs.common.archive import SCHEMA, ParquetArchive, read_archive
from libs.common.klines import read_kline_csv

SHIPPED = Path(__file__).resolve().parents[3] / "data" / "klines"


def shipped_candles(n: int, symbols=("BTCUSDT",)) -> dict:
    return {
        (s, "1m"): read_kline_csv(next(SHIPPED.glob(f"{s}-1m-*.csv.gz")))[:n] for s in symbols
    }


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


def test_a_stream_with_nothing_archived_reads_as_an_empty_frame_of_the_archive_schema(tmp_path):
    a = read_archive(str(tmp_path / "a"), "ETHUSDT", "1m")
    assert a.empty and list(a.columns) == SCHEMA.names
    assert [str(t) for t in a.dtypes] == [str(t) for t in SCHEMA.empty_table().to_pandas().dtypes]
    a["extra"] = 1.0  # a caller changing its frame does not change the next caller's
    b = read_archive(str(tmp_path / "a"), "SOLUSDT", "1m")
    assert b.empty and list(b.columns) == SCHEMA.names


def test_any_fsspec_url(tmp_path):
    (ks,) = shipped_candles(3, symbols=("ETHUSDT",)).values()
    ParquetArchive("memory://klinebus-test").write(ks)
    assert list(read_archive("memory://klinebus-test", "ETHUSDT", "1m")["open_time"]) == [k.open_time for k in ks]


def test_object_store_path_parts_in_parallel_and_compaction(tmp_path):
    """A remote filesystem's code path (a month's parts fetched in parallel; parts renamed into
    place where the store shows a file while it is written) on fsspec's in-memory store, with
    writer threads racing and compacting."""
    import threading

    (ks,) = shipped_candles(60, symbols=("ETHUSDT",)).values()
    root = "memory://klinebus-parts"
    errors: list[BaseException] = []

    def write(share) -> None:
        try:
            archive = ParquetArchive(root, compact_after=4)
            for j in range(0, len(share), 4):
                archive.write(share[j : j + 4])
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(ks[i::3],)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    archive = ParquetArchive(root)
    assert not archive._local
    assert list(archive.read("ETHUSDT", "1m")["open_time"]) == [k.open_time for k in ks]
    archive.compact_all()
    assert len(archive.files("ETHUSDT", "1m")) == 1
    assert list(archive.read("ETHUSDT", "1m")["close"]) == [k.close for k in ks]


# --- append-only parts, concurrent writers, compaction -------------------------------------------

import multiprocessing as mp  # noqa: E402
import threading  # noqa: E402
from dataclasses import replace  # noqa: E402

import pyarrow as pa  # noqa: E402
import pytest  # noqa: E402

from libs.common.archive import ArchiveReadError, is_permanent  # noqa: E402

WRITERS = 4
ROUNDS = 12


def _month_of_candles(n: int) -> list:
    """``n`` real 1m candles moved into one month (2026-03), so every writer races on one month."""
    (ks,) = shipped_candles(n, symbols=("BTCUSDT",)).values()
    base = _ms(2026, 3, 2)
    return [replace(k, open_time=base + i * 60_000, close_time=base + (i + 1) * 60_000 - 1) for i, k in enumerate(ks)]


def _writer(root: str, ks: list, rounds: int, compact_after: int, start: mp.Event) -> None:
    archive = ParquetArchive(root, compact_after=compact_after)
    start.wait()
    for r in range(rounds):
        archive.write(ks[r::rounds])  # small writes, as the archiver's batches are


def test_concurrent_writer_processes_on_one_month_lose_no_row(tmp_path):
    """Writer processes (archiver replicas, the reclaimer, a history import) add their own candles
    and some of each other's to the same month at once, compacting as they go. With the
    read-merge-rewrite of earlier versions the last writer's file won and rows vanished."""
    ks = _month_of_candles(WRITERS * 60)
    root = str(tmp_path / "a")
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    # each writer: its own quarter, plus an overlapping slice of the next (re-deliveries)
    shares = [ks[i * 60 : (i + 1) * 60] + ks[((i + 1) % WRITERS) * 60 :][:10] for i in range(WRITERS)]
    procs = [ctx.Process(target=_writer, args=(root, share, ROUNDS, 3, start)) for share in shares]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    frame = read_archive(root, "BTCUSDT", "1m")
    assert list(frame["open_time"]) == [k.open_time for k in ks]
    assert list(frame["close"]) == [k.close for k in ks]


def test_reads_during_writes_and_compactions_never_miss_a_written_row(tmp_path):
    """Readers race writers that compact after every third part: each read holds every row written
    before it began, once, in order."""
    ks = _month_of_candles(240)
    root = str(tmp_path / "a")
    written: list[int] = []
    lock = threading.Lock()
    done = threading.Event()
    errors: list[str] = []

    def write(share):
        archive = ParquetArchive(root, compact_after=3)
        for i in range(0, len(share), 8):
            archive.write(share[i : i + 8])
            with lock:
                written.extend(k.open_time for k in share[i : i + 8])

    def read():
        archive = ParquetArchive(root)
        while not done.is_set():
            with lock:
                before = set(written)
            got = list(archive.read("BTCUSDT", "1m")["open_time"])
            if got != sorted(set(got)):
                errors.append("duplicate or unsorted rows")
            if not before <= set(got):
                errors.append(f"{len(before - set(got))} written rows missing")

    writers = [threading.Thread(target=write, args=(ks[i::3],)) for i in range(3)]
    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join(120)
    done.set()
    for t in readers:
        t.join(60)
    assert errors == []
    assert list(read_archive(root, "BTCUSDT", "1m")["open_time"]) == [k.open_time for k in ks]


def test_writes_add_parts_and_compaction_merges_them(tmp_path):
    ks = _month_of_candles(30)
    archive = ParquetArchive(str(tmp_path / "a"), compact_after=100)
    for i in range(0, 30, 10):
        assert archive.write(ks[i : i + 10]) == 10
    assert archive.write(ks[5:15]) == 0  # nothing new: no part at all
    (month,) = archive.months("BTCUSDT", "1m")
    assert len(archive.files("BTCUSDT", "1m")) == 3
    assert archive.compact("BTCUSDT", "1m", month) == 3
    assert len(archive.files("BTCUSDT", "1m")) == 1
    assert list(read_archive(str(tmp_path / "a"), "BTCUSDT", "1m")["open_time"]) == [k.open_time for k in ks]
    # a writer compacts by itself once a month holds more than compact_after parts
    small = ParquetArchive(str(tmp_path / "b"), compact_after=2)
    for i in range(0, 30, 5):
        small.write(ks[i : i + 5])
        assert len(small.files("BTCUSDT", "1m")) <= 2
    assert list(small.read("BTCUSDT", "1m")["open_time"]) == [k.open_time for k in ks]


def test_compaction_removes_temp_files_writers_left_when_killed(tmp_path):
    import os
    import time

    ks = _month_of_candles(10)
    archive = ParquetArchive(str(tmp_path / "a"), compact_after=100)
    archive.write(ks[:5])
    archive.write(ks[5:])
    folder = tmp_path / "a" / "BTCUSDT" / "1m"
    stale, fresh = folder / "2026-03.1.x.parquet.tmp-dead", folder / "2026-03.2.y.parquet.tmp-live"
    stale.write_bytes(b"half a part")
    fresh.write_bytes(b"a part being written")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert archive.compact("BTCUSDT", "1m", "2026-03") == 2
    assert not stale.exists() and fresh.exists()
    assert list(archive.read("BTCUSDT", "1m")["open_time"]) == [k.open_time for k in ks]


def test_duplicates_across_parts_are_returned_once_newest_copy_wins(tmp_path):
    """Two writers that both miss each other's part (a race) each add the candle: reads return it once."""
    ks = _month_of_candles(4)
    root = str(tmp_path / "a")
    first, second = ParquetArchive(root), ParquetArchive(root)
    first.write(ks)
    second._open_times = lambda parts: np.empty(0, dtype=np.int64)  # as if it had not seen the first part
    changed = [replace(k, volume=k.volume + 1) for k in ks[1:3]]
    second.write(changed)
    frame = read_archive(root, "BTCUSDT", "1m")
    assert list(frame["open_time"]) == [k.open_time for k in ks]
    assert list(frame["volume"]) == [ks[0].volume, changed[0].volume, changed[1].volume, ks[3].volume]


def test_month_files_of_earlier_versions_are_read_and_compacted(tmp_path):
    """Archives written before parts (one ``<YYYY-MM>.parquet`` per month) read as they were."""
    import pandas as pd

    from libs.common.klines import klines_to_frame

    ks = _month_of_candles(20)
    archive = ParquetArchive(str(tmp_path / "a"))
    legacy = archive.path("BTCUSDT", "1m", "2026-03")
    (tmp_path / "a" / "BTCUSDT" / "1m").mkdir(parents=True)
    klines_to_frame(ks[:10]).to_parquet(legacy)  # as pandas wrote it, with its own metadata
    assert isinstance(pd.read_parquet(legacy), pd.DataFrame)
    assert archive.write(ks[5:]) == 10  # the five already in the month file are not added again
    assert list(archive.read("BTCUSDT", "1m")["open_time"]) == [k.open_time for k in ks]
    assert archive.compact_all() == {("BTCUSDT", "1m", "2026-03"): 2}
    assert not (tmp_path / "a" / "BTCUSDT" / "1m" / "2026-03.parquet").exists()
    assert list(archive.read("BTCUSDT", "1m")["open_time"]) == [k.open_time for k in ks]


# --- errors: permanent or transient ---------------------------------------------------------


class _ClientError(Exception):
    """botocore's ClientError shape: ``response['Error']['Code']``."""

    def __init__(self, code: str) -> None:
        super().__init__(f"An error occurred ({code})")
        self.response = {"Error": {"Code": code}}


class _HttpError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


@pytest.mark.parametrize(
    "exc, permanent",
    [
        (PermissionError(13, "Forbidden"), True),
        (_ClientError("AccessDenied"), True),
        (_ClientError("NoSuchBucket"), True),
        (_ClientError("SlowDown"), False),
        (_HttpError(403), True),
        (_HttpError(404), True),
        (_HttpError(429), False),
        (_HttpError(503), False),
        (TimeoutError("read timed out"), False),
        (ConnectionResetError(104, "reset"), False),
        (OSError("s3 connection pool closed"), False),
        (pa.ArrowInvalid("Parquet magic bytes not found"), True),
        (ValueError("a bug"), True),
    ],
)
def test_errors_are_classified_permanent_or_transient(exc, permanent):
    assert is_permanent(exc) is permanent
    wrapped = OSError("s3fs wraps it")
    wrapped.__cause__ = exc
    if type(exc) in (OSError, ValueError):
        return  # nothing in it says more than the wrapper does
    assert is_permanent(wrapped) is permanent


def test_a_corrupt_part_is_a_permanent_read_error(tmp_path):
    ks = _month_of_candles(5)
    archive = ParquetArchive(str(tmp_path / "a"))
    archive.write(ks)
    (part,) = archive.files("BTCUSDT", "1m")
    with open(part, "wb") as fh:
        fh.write(b"not parquet at all")
    with pytest.raises(ArchiveReadError) as info:
        archive.read("BTCUSDT", "1m")
    assert info.value.permanent and is_permanent(info.value)
    assert "permanent" in str(info.value)
