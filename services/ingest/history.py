"""History import: data.binance.vision zip archives -> the Parquet archive, topped up over REST.

"Fetch once, reuse forever": a metadata record per symbol/interval
(``<archive>/_meta/<SYMBOL>-<interval>.json``) lists the zip files already imported and the
open_time range held, so a second import downloads nothing it already has. Monthly zips
are used for complete months, daily zips where a month is not published yet; every zip is
checked against its ``.CHECKSUM`` (sha256) file before it is read. Timestamps in µs (spot
files since 2025) are read as ms by ``libs.common.klines``. Candles after the last zip are
fetched over REST (only the missing range).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import aiohttp

from libs.common.klines import interval_ms, read_kline_csv
from libs.common.archive import ParquetArchive
from services.ingest.rest import RestKlines

log = logging.getLogger("klinebus.ingest.history")


class ChecksumMismatch(RuntimeError):
    pass


@dataclass
class HoldRecord:
    symbol: str
    interval: str
    files: list[str] = field(default_factory=list)
    first_open_time: int | None = None
    last_open_time: int | None = None

    def note(self, open_times: Sequence[int]) -> None:
        if not open_times:
            return
        lo, hi = min(open_times), max(open_times)
        self.first_open_time = lo if self.first_open_time is None else min(self.first_open_time, lo)
        self.last_open_time = hi if self.last_open_time is None else max(self.last_open_time, hi)


def _day(ms: int) -> dt.date:
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).date()


def plan_files(symbol: str, interval: str, start: dt.date, end: dt.date, today: dt.date) -> list[tuple[str, str]]:
    """(kind, name) for every archive file covering [start, end]: monthly for months that ended
    before ``today``'s month, daily (up to yesterday) for the rest."""
    out: list[tuple[str, str]] = []
    month = dt.date(start.year, start.month, 1)
    this_month = dt.date(today.year, today.month, 1)
    while month <= end:
        nxt = dt.date(month.year + month.month // 12, month.month % 12 + 1, 1)
        if month < this_month:
            out.append(("monthly", f"{symbol}-{interval}-{month:%Y-%m}.zip"))
        else:
            day = max(month, start)
            while day <= end and day < today and day < nxt:
                out.append(("daily", f"{symbol}-{interval}-{day:%Y-%m-%d}.zip"))
                day += dt.timedelta(days=1)
        month = nxt
    return out


class HistoryImporter:
    def __init__(self, archive: ParquetArchive, base_url: str, rest: RestKlines | None = None) -> None:
        self.archive = archive
        self.base_url = base_url.rstrip("/")
        self.rest = rest

    # --- metadata --------------------------------------------------------------------------

    def _meta_path(self, symbol: str, interval: str) -> str:
        return f"{self.archive.root}/_meta/{symbol}-{interval}.json"

    def load_record(self, symbol: str, interval: str) -> HoldRecord:
        path = self._meta_path(symbol, interval)
        if not self.archive.fs.exists(path):
            return HoldRecord(symbol, interval)
        with self.archive.fs.open(path, "r") as fh:
            return HoldRecord(**json.load(fh))

    def save_record(self, record: HoldRecord) -> None:
        path = self._meta_path(record.symbol, record.interval)
        self.archive.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"  # two imports of one stream must not share a temp file
        with self.archive.fs.open(tmp, "w") as fh:
            json.dump(record.__dict__, fh, indent=1)
        self.archive.fs.mv(tmp, path)

    # --- import ------------------------------------------------------------------------------

    async def run(
        self,
        symbols: Sequence[str],
        intervals: Sequence[str],
        start: dt.date,
        end: dt.date,
        *,
        today: dt.date | None = None,
        top_up: bool = True,
        progress: Callable[[str, int, int], None] | None = None,
    ) -> dict[tuple[str, str], int]:
        """Import [start, end] (UTC days, inclusive); returns new rows per stream."""
        today = today or dt.datetime.now(dt.timezone.utc).date()
        added: dict[tuple[str, str], int] = {}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
            for symbol in symbols:
                for interval in intervals:
                    added[(symbol, interval)] = await self._one(
                        http, symbol, interval, start, end, today, top_up, progress
                    )
        return added

    async def _one(self, http, symbol, interval, start, end, today, top_up, progress) -> int:
        record = self.load_record(symbol, interval)
        files = [f for f in plan_files(symbol, interval, start, end, today) if f[1] not in record.files]
        added = 0
        for n, (kind, name) in enumerate(files, start=1):
            if progress:
                progress(f"{symbol} {interval} {name}", n, len(files))
            url = f"{self.base_url}/data/spot/{kind}/klines/{symbol}/{interval}/{name}"
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / name
                if not await self._download(http, url, path):
                    log.info("%s: not published (404), skipping", url)
                    continue
                klines = read_kline_csv(path, symbol, interval)
            added += self.archive.write(klines)
            record.files.append(name)
            record.note([k.open_time for k in klines])
            self.save_record(record)
        if top_up and self.rest is not None:
            added += await self._top_up(record, start, end)
        return added

    async def _download(self, http: aiohttp.ClientSession, url: str, path: Path) -> bool:
        async with http.get(url + ".CHECKSUM") as resp:
            if resp.status == 404:
                return False
            resp.raise_for_status()
            expected = (await resp.text()).split()[0].strip().lower()
        digest = hashlib.sha256()
        async with http.get(url) as resp:
            if resp.status == 404:
                return False
            resp.raise_for_status()
            with open(path, "wb") as fh:
                async for chunk in resp.content.iter_chunked(1 << 16):
                    digest.update(chunk)
                    fh.write(chunk)
        if digest.hexdigest() != expected:
            raise ChecksumMismatch(f"{url}: sha256 {digest.hexdigest()} does not match its .CHECKSUM {expected}")
        return True

    async def _top_up(self, record: HoldRecord, start: dt.date, end: dt.date) -> int:
        """REST for what the zips did not cover, up to ``end`` (only the missing tail)."""
        step = interval_ms(record.interval)
        start_ms = int(dt.datetime(start.year, start.month, start.day, tzinfo=dt.timezone.utc).timestamp() * 1000)
        end_ms = int(dt.datetime(end.year, end.month, end.day, tzinfo=dt.timezone.utc).timestamp() * 1000) + 86_400_000 - 1
        begin = record.last_open_time + step if record.last_open_time is not None else start_ms
        begin = max(begin, start_ms)
        if begin > end_ms:
            return 0
        klines = await self.rest.closed_klines(record.symbol, record.interval, begin, end_ms)  # type: ignore[union-attr]
        if not klines:
            return 0
        added = self.archive.write(klines)
        record.note([k.open_time for k in klines])
        self.save_record(record)
        return added
