"""Archive reads and writes: the append-only part archive beside the single-month-file archive it
replaced (read-merge-rewrite), both measured in the same run on the same candles.

Reads: one stream's ``months`` months of 1m candles (43,200 rows a month), as the features
warm-up and the trainer read it, from
  * ``month-file``: the earlier layout, one file per month (the reference);
  * ``compacted``: the part archive after compaction (one part per month);
  * ``parts``: the part archive at its worst before compaction (``compact_after`` parts a month).
Writes: ``batches`` archiver batches of ``batch`` candles into a month that already holds
``prefill`` rows: the earlier archive re-read and rewrote the month file per batch; the part
archive writes one small part (and compacts every ``compact_after`` parts).

    .venv/bin/python bench/bench_archive.py [--months 3] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from libs.common.archive import COMPACT_AFTER_PARTS, ParquetArchive, month_of  # noqa: E402
from libs.common.klines import Kline, klines_to_frame, read_kline_csv  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "data" / "klines"
MONTH_ROWS = 43_200  # 1m candles in a 30-day month
MINUTE = 60_000


class MonthFileArchive:
    """The reference: the archive before parts (one file per month, merged and rewritten per write)."""

    def __init__(self, root: str) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(root)

    def path(self, symbol: str, interval: str, month: str) -> str:
        return f"{self.root}/{symbol}/{interval}/{month}.parquet"

    def write(self, klines: list[Kline]) -> None:
        groups: dict[tuple[str, str, str], list[Kline]] = {}
        for k in klines:
            groups.setdefault((k.symbol, k.interval, month_of(k.open_time)), []).append(k)
        for (symbol, interval, month), ks in groups.items():
            path = self.path(symbol, interval, month)
            new = klines_to_frame(ks).assign(closed=True)
            merged = pd.concat([self._read(path), new], ignore_index=True) if self.fs.exists(path) else new
            merged = merged.drop_duplicates("open_time", keep="last").sort_values("open_time", kind="stable")
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with self.fs.open(tmp, "wb") as fh:
                pq.write_table(pa.Table.from_pandas(merged, preserve_index=False), fh, compression="zstd")
            self.fs.mv(tmp, path)

    def _read(self, path: str) -> pd.DataFrame:
        with self.fs.open(path, "rb") as fh:
            return pq.read_table(fh).to_pandas()

    def read(self, symbol: str, interval: str) -> pd.DataFrame:
        folder = f"{self.root}/{symbol}/{interval}"
        months = sorted(p for p in self.fs.ls(folder, detail=False) if p.endswith(".parquet"))
        out = pd.concat([self._read(p) for p in months], ignore_index=True)
        return out.sort_values("open_time", kind="stable").reset_index(drop=True)


def candles(n: int) -> list[Kline]:
    """``n`` consecutive 1m candles from 2026-01-01: the shipped BTCUSDT candles, repeated."""
    src = read_kline_csv(next(DATA.glob("BTCUSDT-1m-*.csv.gz")))
    base = 1_767_225_600_000  # 2026-01-01T00:00Z
    return [replace(src[i % len(src)], open_time=base + i * MINUTE, close_time=base + (i + 1) * MINUTE - 1) for i in range(n)]


def timed(fn, repeat: int) -> float:
    fn()  # warm (page cache, imports)
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--months", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--compact-after", type=int, default=COMPACT_AFTER_PARTS)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--prefill", type=int, default=30_000)
    args = ap.parse_args()

    ks = candles(args.months * MONTH_ROWS)
    by_month: dict[str, list[Kline]] = {}
    for k in ks:
        by_month.setdefault(month_of(k.open_time), []).append(k)
    with tempfile.TemporaryDirectory() as tmp:
        old = MonthFileArchive(f"{tmp}/old")
        old.write(ks)
        compacted = ParquetArchive(f"{tmp}/compacted")
        compacted.write(ks)
        parts = ParquetArchive(f"{tmp}/parts", compact_after=10**9)
        for month_ks in by_month.values():
            step = -(-len(month_ks) // args.compact_after)
            for i in range(0, len(month_ks), step):
                parts.write(month_ks[i : i + step])
        n_parts = len(parts.files("BTCUSDT", "1m"))
        ref = old.read("BTCUSDT", "1m")
        for name, a in (("compacted", compacted), ("parts", parts)):
            got = a.read("BTCUSDT", "1m")
            assert list(got["open_time"]) == list(ref["open_time"]), f"{name} reads different rows"

        t_old = timed(lambda: old.read("BTCUSDT", "1m"), args.repeat)
        t_comp = timed(lambda: compacted.read("BTCUSDT", "1m"), args.repeat)
        t_parts = timed(lambda: parts.read("BTCUSDT", "1m"), args.repeat)
        rows = len(ref)
        print(f"read {rows:,} rows ({args.months} months of 1m), median of {args.repeat}:")
        print(f"  month-file (reference)    {t_old * 1000:8.1f} ms   {rows / t_old / 1e6:6.2f} M rows/s   1.00x")
        print(f"  parts, compacted          {t_comp * 1000:8.1f} ms   {rows / t_comp / 1e6:6.2f} M rows/s   {t_old / t_comp:4.2f}x")
        print(f"  parts, {n_parts:4d} uncompacted   {t_parts * 1000:8.1f} ms   {rows / t_parts / 1e6:6.2f} M rows/s   {t_old / t_parts:4.2f}x")

        # writes: archiver-sized batches into a month already holding ``prefill`` rows
        live = candles(args.prefill + args.batches * args.batch)
        pre, tail = live[: args.prefill], live[args.prefill :]
        w_old, w_new = MonthFileArchive(f"{tmp}/w-old"), ParquetArchive(f"{tmp}/w-new", compact_after=args.compact_after)
        w_old.write(pre)
        w_new.write(pre)
        t0 = time.perf_counter()
        for i in range(0, len(tail), args.batch):
            w_old.write(tail[i : i + args.batch])
        t_w_old = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(0, len(tail), args.batch):
            w_new.write(tail[i : i + args.batch])
        t_w_new = time.perf_counter() - t0
        assert len(w_new.read("BTCUSDT", "1m")) == len(live)
        per_old, per_new = t_w_old / args.batches, t_w_new / args.batches
        print(f"write {args.batches} batches of {args.batch} candles into a month of {args.prefill:,} rows:")
        print(f"  month-file rewrite (ref)  {per_old * 1000:8.1f} ms/batch   1.00x")
        print(f"  new part (+ compaction)   {per_new * 1000:8.1f} ms/batch   {per_old / per_new:4.2f}x")


if __name__ == "__main__":
    main()
