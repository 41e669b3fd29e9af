"""Where training candles come from: the Parquet archive (libs/common/archive.py) or Binance kline files.

``load_series`` returns one time-sorted frame per (symbol, interval) with the files it was read
from and their sha256 (datasets record them); ``data_stats`` is ``klinebus data stats``.
"""

from __future__ import annotations

import datetime as dt
import glob
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd

from libs.common.archive import ParquetArchive
from libs.common.klines import INTERVAL_MS, InvalidKline, infer_symbol_interval, read_kline_frame

KLINE_FILE_SUFFIXES = (".csv", ".csv.gz", ".zip", ".parquet")
PRICE_COLUMNS = ["open_time", "open", "high", "low", "close", "volume"]


class SourceError(ValueError):
    """Input that cannot give the asked candles (no such files, unknown symbol, empty range)."""


@dataclass
class SourceFile:
    path: str
    sha256: str
    rows: int


@dataclass
class Series:
    symbol: str
    interval: str
    frame: pd.DataFrame  # PRICE_COLUMNS, sorted by open_time, unique open times
    sources: list[SourceFile] = field(default_factory=list)
    last_update_ms: int | None = None  # newest modification time of its files

    @property
    def step_ms(self) -> int:
        return INTERVAL_MS[self.interval]


def _sha256(fs: fsspec.AbstractFileSystem, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _mtime_ms(fs: fsspec.AbstractFileSystem, path: str) -> int | None:
    try:
        m = fs.modified(path)
    except Exception:
        return None
    if m.tzinfo is None:  # fsspec's local filesystem answers naive UTC
        m = m.replace(tzinfo=dt.timezone.utc)
    return int(m.timestamp() * 1000)


def _is_kline_file(name: str) -> bool:
    """A file a folder listing picks up: a kline suffix and Binance's SYMBOL-INTERVAL-... name."""
    if not name.lower().endswith(KLINE_FILE_SUFFIXES):
        return False
    try:
        infer_symbol_interval(name)
    except InvalidKline:
        return False
    return True


def kline_files(inputs: list[str]) -> list[str] | None:
    """The kline files ``inputs`` name (files, globs or folders holding them); None if it is an archive."""
    if len(inputs) == 1 and ("://" in inputs[0] or not (os.path.exists(inputs[0]) or glob.has_magic(inputs[0]))):
        return None  # an archive root (the archive branch says so if it does not exist)
    if len(inputs) == 1 and os.path.isdir(inputs[0]):
        direct = sorted(str(p) for p in Path(inputs[0]).iterdir() if p.is_file() and _is_kline_file(p.name))
        return direct or None
    files: set[str] = set()
    for pattern in inputs:
        matched = glob.glob(pattern)
        if not matched:
            raise SourceError(f"no kline files match {pattern}")
        for m in matched:
            if os.path.isdir(m):
                files.update(str(p) for p in Path(m).iterdir() if p.is_file() and _is_kline_file(p.name))
            else:
                files.add(m)  # named explicitly: a bad name is an error later, not a silent skip
    if not files:
        raise SourceError(f"no kline files (.csv, .csv.gz, .zip, .parquet) in {' '.join(inputs)}")
    return sorted(files)


def _want(value: str, wanted: list[str] | None) -> bool:
    return wanted is None or value in wanted


def _clip(frame: pd.DataFrame, start: int | None, end: int | None) -> pd.DataFrame:
    if start is not None:
        frame = frame[frame["open_time"] >= start]
    if end is not None:
        frame = frame[frame["open_time"] <= end]
    return frame


def _finish(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frame = pd.concat(frames, ignore_index=True)[PRICE_COLUMNS]
    frame = frame.drop_duplicates("open_time", keep="last").sort_values("open_time", kind="stable")
    return frame.astype({"open_time": "int64"} | {c: "float64" for c in PRICE_COLUMNS[1:]}).reset_index(drop=True)


def load_series(
    inputs: list[str] | str,
    symbols: list[str] | None = None,
    intervals: list[str] | None = None,
    start: int | None = None,
    end: int | None = None,
    with_hashes: bool = True,
) -> dict[tuple[str, str], Series]:
    """Candles per (symbol, interval) from an archive root (folder or fsspec URL) or kline files.

    Raises ``SourceError`` when nothing matches, naming what was asked and what exists.
    """
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    symbols = [s.upper() for s in symbols] if symbols else None
    files = kline_files(inputs)
    out: dict[tuple[str, str], Series] = {}
    available: set[tuple[str, str]] = set()
    if files is not None:
        local = fsspec.filesystem("file")
        groups: dict[tuple[str, str], list[str]] = {}
        for f in files:
            try:
                key = infer_symbol_interval(f)
            except InvalidKline as e:
                raise SourceError(str(e)) from None
            available.add(key)
            if _want(key[0], symbols) and _want(key[1], intervals):
                groups.setdefault(key, []).append(f)
        for (symbol, interval), paths in sorted(groups.items()):
            frames, sources = [], []
            for p in paths:
                try:
                    frame = read_kline_frame(p, symbol, interval)
                except InvalidKline as e:
                    raise SourceError(str(e)) from None
                frames.append(_clip(frame, start, end))
                sources.append(SourceFile(p, _sha256(local, p) if with_hashes else "", len(frame)))
            mt = [m for m in (_mtime_ms(local, p) for p in paths) if m is not None]
            out[(symbol, interval)] = Series(symbol, interval, _finish(frames), sources, max(mt, default=None))
    else:
        root = inputs[0]
        archive = ParquetArchive(root)
        fs = archive.fs
        if not fs.exists(archive.root):
            raise SourceError(f"{root}: no such archive or kline file folder")
        for sym_dir in sorted(fs.ls(archive.root, detail=False)):
            symbol = sym_dir.rstrip("/").rsplit("/", 1)[-1]
            if not fs.isdir(sym_dir):
                continue
            for int_dir in sorted(fs.ls(sym_dir, detail=False)):
                interval = int_dir.rstrip("/").rsplit("/", 1)[-1]
                if interval not in INTERVAL_MS or not fs.isdir(int_dir):
                    continue
                available.add((symbol, interval))
                if not (_want(symbol, symbols) and _want(interval, intervals)):
                    continue
                months = archive.months(symbol, interval)
                if not months:
                    continue
                frame = archive.read(symbol, interval, start, end)
                paths = archive.files(symbol, interval)  # the parts holding its rows now
                sources = [SourceFile(p, _sha256(fs, p) if with_hashes else "", 0) for p in paths]
                mt = [m for m in (_mtime_ms(fs, p) for p in paths) if m is not None]
                out[(symbol, interval)] = Series(
                    symbol, interval, _finish([frame]) if len(frame) else frame[PRICE_COLUMNS], sources,
                    max(mt, default=None),
                )
    have = ", ".join(f"{s} {i}" for s, i in sorted(available)) or "nothing"
    missing = [f"{sym} {i}" for sym in (symbols or []) for i in (intervals or []) if (sym, i) not in out]
    missing += [sym for sym in (symbols or []) if not intervals and not any(k[0] == sym for k in out)]
    missing += [i for i in (intervals or []) if not symbols and not any(k[1] == i for k in out)]
    if missing:
        raise SourceError(f"no candles for {', '.join(missing)} in {' '.join(inputs)} (it has: {have})")
    if not out:
        raise SourceError(f"no candles in {' '.join(inputs)} for the asked symbols/intervals")
    empty = [f"{k[0]} {k[1]}" for k, s in out.items() if len(s.frame) == 0]
    if empty:
        raise SourceError(f"no candles for {', '.join(empty)} in the asked time range")
    return out


@dataclass
class StreamStats:
    symbol: str
    interval: str
    rows: int
    first_open_time: int | None
    last_open_time: int | None
    gaps: int
    missing_candles: int
    last_update_ms: int | None
    files: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def series_stats(s: Series) -> StreamStats:
    ot = s.frame["open_time"].to_numpy(np.int64)
    steps = np.diff(ot) // s.step_ms if len(ot) > 1 else np.zeros(0, np.int64)
    holes = steps[steps > 1] - 1
    return StreamStats(
        s.symbol, s.interval, len(ot),
        int(ot[0]) if len(ot) else None, int(ot[-1]) if len(ot) else None,
        int(len(holes)), int(holes.sum()), s.last_update_ms, len(s.sources),
    )


def data_stats(inputs: list[str] | str, symbols: list[str] | None = None, intervals: list[str] | None = None) -> list[StreamStats]:
    series = load_series(inputs, symbols, intervals, with_hashes=False)
    return [series_stats(s) for _, s in sorted(series.items())]


def fmt_ms(ms: int | None) -> str:
    if ms is None:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
