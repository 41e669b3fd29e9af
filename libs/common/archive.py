"""The Parquet klines archive: ``<root>/<SYMBOL>/<interval>/<YYYY-MM>.parquet``.

One file per symbol, interval and UTC month (of open_time), sorted by open_time, one row per
candle. Writes are idempotent (a re-delivered candle replaces its row) and atomic (the new
file is written beside the old one and moved over it, so a reader never sees half a file).
``root`` is a local folder or any fsspec URL (s3://, gs://, memory://, ...).
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Iterable

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from libs.common.klines import Kline, klines_to_frame

COLUMNS = list(Kline.__dataclass_fields__)


def month_of(open_time_ms: int) -> str:
    return dt.datetime.fromtimestamp(open_time_ms / 1000, dt.timezone.utc).strftime("%Y-%m")


class ParquetArchive:
    def __init__(self, root: str) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(str(root))
        self.root = self.root.rstrip("/")

    def path(self, symbol: str, interval: str, month: str) -> str:
        return f"{self.root}/{symbol}/{interval}/{month}.parquet"

    def write(self, klines: Iterable[Kline]) -> int:
        """Merge closed candles into their month files; returns how many rows are new."""
        groups: dict[tuple[str, str, str], list[Kline]] = {}
        for k in klines:
            groups.setdefault((k.symbol, k.interval, month_of(k.open_time)), []).append(k)
        added = 0
        for (symbol, interval, month), ks in groups.items():
            added += self._merge(self.path(symbol, interval, month), klines_to_frame(ks))
        return added

    def _merge(self, path: str, new: pd.DataFrame) -> int:
        new = new.assign(closed=True)[COLUMNS]
        if self.fs.exists(path):
            old = self._read(path)
            before = len(old)
            merged = pd.concat([old, new], ignore_index=True)
        else:
            before = 0
            merged = new
        merged = (
            merged.drop_duplicates("open_time", keep="last").sort_values("open_time", kind="stable").reset_index(drop=True)
        )
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with self.fs.open(tmp, "wb") as fh:
            pq.write_table(pa.Table.from_pandas(merged, preserve_index=False), fh, compression="zstd")
        self.fs.mv(tmp, path)  # a rename on local disks; object stores replace whole objects anyway
        return len(merged) - before

    def _read(self, path: str) -> pd.DataFrame:
        with self.fs.open(path, "rb") as fh:
            return pq.read_table(fh).to_pandas()

    def months(self, symbol: str, interval: str) -> list[str]:
        folder = f"{self.root}/{symbol}/{interval}"
        if not self.fs.exists(folder):
            return []
        return sorted(p.rsplit("/", 1)[1][: -len(".parquet")] for p in self.fs.ls(folder, detail=False) if p.endswith(".parquet"))

    def read(self, symbol: str, interval: str, start: int | None = None, end: int | None = None) -> pd.DataFrame:
        """Candles with ``start <= open_time <= end`` (ms; None: unbounded), sorted, Kline columns."""
        lo = month_of(start) if start is not None else ""
        hi = month_of(end) if end is not None else "9999-99"
        frames = [self._read(self.path(symbol, interval, m)) for m in self.months(symbol, interval) if lo <= m <= hi]
        if not frames:
            return pd.DataFrame({c: pd.Series(dtype=t) for c, t in _EMPTY_DTYPES.items()})
        out = pd.concat(frames, ignore_index=True)
        if start is not None:
            out = out[out["open_time"] >= start]
        if end is not None:
            out = out[out["open_time"] <= end]
        return out.sort_values("open_time", kind="stable").reset_index(drop=True)


_EMPTY_DTYPES = {c: ("object" if c in ("symbol", "interval") else "bool" if c == "closed" else "int64" if c in ("open_time", "close_time", "trades") else "float64") for c in COLUMNS}


def read_archive(root: str, symbol: str, interval: str, start: int | None = None, end: int | None = None) -> pd.DataFrame:
    """What the features and trainer services call: the archived candles of one stream."""
    return ParquetArchive(root).read(symbol.upper(), interval, start, end)
