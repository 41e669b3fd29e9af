"""The archiver: closed candles from ``klines.v1`` into the Parquet archive.

``klinebus run archive`` starts it. Delivery is at-least-once; the archive write is
idempotent on (symbol, interval, open_time), so a re-delivered event changes nothing. Writes
only ever add part files (``libs.common.archive``), so archiver replicas, the reclaimer and
``klinebus history import`` writing the same month at once lose no row.
"""

from __future__ import annotations

import asyncio
import logging

from libs.common import topics
from libs.common.contracts import KlineEvent
from libs.common.service import ServiceRuntime
from services.ingest.settings import IngestSettings
from libs.common.archive import ParquetArchive
from services.ingest.ratelog import MinuteLog

SETTINGS = IngestSettings
log = logging.getLogger("klinebus.archive")


def create(settings: IngestSettings, url: str) -> ServiceRuntime:
    runtime = ServiceRuntime(
        "archive", settings, url, description="Writes closed candles from klines.v1 to the Parquet archive."
    )
    archive = ParquetArchive(settings.archive_root())
    written = runtime.metrics.counter("rows_written_total", "New candle rows written to the archive", ["interval"])
    minute = MinuteLog(log, "archive", ("rows_written", "already_archived", "batches"))

    # Batches: one part file per (stream, month) per batch, not per candle, so a backfill of
    # thousands of candles costs a few writes.
    @runtime.bus.competing_batch(topics.KLINES, KlineEvent, max_records=1000, description="Archive every closed candle.")
    async def on_klines(events: list[KlineEvent]) -> None:
        added = await asyncio.to_thread(archive.write, [e.to_kline() for e in events])
        if added:
            written.labels(events[0].interval).inc(added)
        if len(events) > added:
            runtime.metrics.duplicates.labels(topics.KLINES).inc(len(events) - added)
        minute.add(rows_written=added, already_archived=len(events) - added, batches=1)

    @runtime.on_startup
    async def announce() -> None:
        log.info("archive: writing klines.v1 to %s (append-only parts, compacted after %d per month)",
                 archive.url, archive.compact_after)

    @runtime.on_shutdown
    async def last_minute() -> None:
        minute.flush()

    runtime.archive = archive  # type: ignore[attr-defined]
    return runtime


create_archiver = create
