"""History import from data.binance.vision-style zips served on loopback, with checksums,
µs timestamps, the metadata record that prevents re-downloads, and the REST top-up."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import zipfile

import pytest
from aiohttp import web

from libs.common.archive import ParquetArchive, read_archive
from services.ingest.history import ChecksumMismatch, HistoryImporter, plan_files
from services.ingest.rest import RestKlines
from services.ingest.simulator import ExchangeSimulator

from ingest_support import shipped_candles


def _zip(name: str, rows: list[str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(name.replace(".zip", ".csv"), "\n".join(rows) + "\n")
    return buf.getvalue()


def _row(k, scale=1):
    return f"{k.open_time * scale},{k.open},{k.high},{k.low},{k.close},{k.volume},{k.close_time * scale + (scale - 1)},0,0,0,0,0"


class Vision:
    """A loopback stand-in for data.binance.vision; counts downloads."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.hits: list[str] = []

    def add(self, kind: str, name: str, rows: list[str], corrupt: bool = False) -> None:
        symbol, interval = name.split("-")[:2]
        path = f"/data/spot/{kind}/klines/{symbol}/{interval}/{name}"
        body = _zip(name, rows)
        digest = hashlib.sha256(b"x" + body if corrupt else body).hexdigest()
        self.files[path] = body
        self.files[path + ".CHECKSUM"] = f"{digest}  {name}\n".encode()

    async def handle(self, request: web.Request) -> web.Response:
        self.hits.append(request.path)
        body = self.files.get(request.path)
        return web.Response(body=body) if body is not None else web.Response(status=404)


@pytest.fixture
async def vision():
    v = Vision()
    app = web.Application()
    app.router.add_get("/{tail:.*}", v.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    v.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    yield v
    await runner.cleanup()


def test_plan_uses_monthly_then_daily_files():
    plan = plan_files("BTCUSDT", "1m", dt.date(2026, 3, 30), dt.date(2026, 4, 16), today=dt.date(2026, 4, 3))
    assert plan == [("monthly", "BTCUSDT-1m-2026-03.zip"), ("daily", "BTCUSDT-1m-2026-04-01.zip"), ("daily", "BTCUSDT-1m-2026-04-02.zip")]


async def test_import_verifies_checksums_reads_microseconds_and_never_refetches(vision, tmp_path):
    (ks,) = shipped_candles(30, symbols=("BTCUSDT",)).values()  # 2026-04-15 candles
    vision.add("daily", "BTCUSDT-1m-2026-04-15.zip", [_row(k, scale=1000) for k in ks[:20]])  # µs, as since 2025
    archive = ParquetArchive(str(tmp_path / "archive"))
    importer = HistoryImporter(archive, vision.url)
    added = await importer.run(["BTCUSDT"], ["1m"], dt.date(2026, 4, 15), dt.date(2026, 4, 15), today=dt.date(2026, 4, 20), top_up=False)
    assert added == {("BTCUSDT", "1m"): 20}
    frame = read_archive(str(tmp_path / "archive"), "BTCUSDT", "1m")
    assert list(frame["open_time"]) == [k.open_time for k in ks[:20]]
    assert list(frame["close_time"]) == [k.close_time for k in ks[:20]]
    hits = len(vision.hits)
    again = await importer.run(["BTCUSDT"], ["1m"], dt.date(2026, 4, 15), dt.date(2026, 4, 15), today=dt.date(2026, 4, 20), top_up=False)
    assert again == {("BTCUSDT", "1m"): 0} and len(vision.hits) == hits  # fetch once, reuse forever
    record = importer.load_record("BTCUSDT", "1m")
    assert record.files == ["BTCUSDT-1m-2026-04-15.zip"] and record.last_open_time == ks[19].open_time


async def test_corrupt_zip_is_refused(vision, tmp_path):
    (ks,) = shipped_candles(5, symbols=("ETHUSDT",)).values()
    vision.add("daily", "ETHUSDT-1m-2026-04-15.zip", [_row(k) for k in ks], corrupt=True)
    importer = HistoryImporter(ParquetArchive(str(tmp_path / "a")), vision.url)
    with pytest.raises(ChecksumMismatch):
        await importer.run(["ETHUSDT"], ["1m"], dt.date(2026, 4, 15), dt.date(2026, 4, 15), today=dt.date(2026, 4, 20), top_up=False)
    assert read_archive(str(tmp_path / "a"), "ETHUSDT", "1m").empty


async def test_rest_top_up_fetches_only_the_missing_tail(vision, tmp_path):
    candles = shipped_candles(40, symbols=("SOLUSDT",))
    (ks,) = candles.values()
    vision.add("daily", "SOLUSDT-1m-2026-04-15.zip", [_row(k) for k in ks[:25]])
    async with ExchangeSimulator(candles, speed=1e6) as sim:  # every candle has closed on its clock
        rest = RestKlines(sim.rest_url)
        try:
            importer = HistoryImporter(ParquetArchive(str(tmp_path / "a")), vision.url, rest)
            added = await importer.run(["SOLUSDT"], ["1m"], dt.date(2026, 4, 15), dt.date(2026, 4, 15), today=dt.date(2026, 4, 20))
        finally:
            await rest.close()
        assert sim.stats.rest_requests == 1
    assert added == {("SOLUSDT", "1m"): 40}
    frame = read_archive(str(tmp_path / "a"), "SOLUSDT", "1m")
    assert list(frame["open_time"]) == [k.open_time for k in ks]
