"""The Parquet archive: partitioning, idempotent re-delivery, atomic replace, reading back."""

from __future__ import annotations

import datetime as dt

from pathlib import Path

from libs.common.archive import ParquetArchive, read_archive
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


def test_any_fsspec_url(tmp_path):
    (ks,) = shipped_candles(3, symbols=("ETHUSDT",)).values()
    ParquetArchive("memory://klinebus-test").write(ks)
    assert list(read_archive("memory://klinebus-test", "ETHUSDT", "1m")["open_time"]) == [k.open_time for k in ks]
