"""Per-stream ordering and gap repair.

Each (symbol, interval) has one worker that handles, in arrival order, the closed candles
from the websocket and "catch up" requests (after a reconnect, a rotation, a
``serverShutdown`` or a silent stretch). A closed candle more than one interval after the
last published one is a gap: the missing candles are fetched over REST and published, in
order, before it. Because one worker per stream does all of this, live candles that arrive
during a backfill wait behind it and nothing is published out of order.

The tracker knows nothing of Redis or HTTP: it gets ``publish`` and ``fetch`` callables.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from libs.common.klines import Kline, interval_ms

log = logging.getLogger("klinebus.ingest.tracker")

Publish = Callable[[Kline, str], Awaitable[tuple[bool, int]]]
Fetch = Callable[[str, str, int, "int | None"], Awaitable[list[Kline]]]


@dataclass(frozen=True)
class CatchUp:
    reason: str


class StreamTracker:
    def __init__(
        self,
        symbol: str,
        interval: str,
        last_open_time: int | None,
        publish: Publish,
        fetch: Fetch,
        metrics: Any,
        on_backfill_error: Callable[[str, str, BaseException], None] | None = None,
    ) -> None:
        self.symbol = symbol
        self.interval = interval
        self.step = interval_ms(interval)
        self.last = last_open_time
        self._publish = publish
        self._fetch = fetch
        self.metrics = metrics
        self._queue: asyncio.Queue[Kline | CatchUp] = asyncio.Queue()
        self._pending_catch_up: str | None = None
        self.last_silence_check = 0  # exchange ms of the last silence-triggered catch-up

    # --- inputs (called by the websocket side; never block) ------------------------------

    def closed(self, k: Kline) -> None:
        self._queue.put_nowait(k)

    def catch_up(self, reason: str) -> None:
        if self._pending_catch_up is None:  # one queued catch-up covers any number of triggers
            self._pending_catch_up = reason
            self._queue.put_nowait(CatchUp(reason))

    def idle(self) -> bool:
        return self._queue.empty() and self._pending_catch_up is None

    # --- the worker ------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            item = await self._queue.get()
            try:
                if isinstance(item, CatchUp):
                    self._pending_catch_up = None
                    await self._backfill(item.reason, until=None)
                else:
                    await self._on_closed(item)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a failed backfill must not kill the stream
                log.exception("%s %s: %s", self.symbol, self.interval, exc)
                if isinstance(item, Kline):
                    # Leave the candle for the next catch-up: publishing it now would skip the gap.
                    self.metrics.backfill_failures.labels(self.interval).inc()
                    await asyncio.sleep(1.0)
                    self.catch_up("retry")

    async def _on_closed(self, k: Kline) -> None:
        if self.last is not None and k.open_time <= self.last:
            self.metrics.duplicates.labels("klines.v1").inc()
            return
        if self.last is not None and k.open_time > self.last + self.step:
            await self._backfill("jump", until=k.open_time - 1)
        await self._emit(k, "ws")

    async def _emit(self, k: Kline, source: str) -> None:
        appended, last = await self._publish(k, source)
        if appended:
            self.metrics.published.labels(source).inc()
        else:
            self.metrics.duplicates.labels("klines.v1").inc()
        self.last = last if self.last is None else max(self.last, last)

    async def _backfill(self, reason: str, until: int | None) -> None:
        if self.last is None:
            return  # nothing published yet: there is no gap to speak of
        start = self.last + self.step
        if until is not None and until < start:
            return
        t0 = time.perf_counter()
        fetched = await self._fetch(self.symbol, self.interval, start, until)
        published = 0
        for k in fetched:
            if k.open_time > self.last:
                before = self.last
                await self._emit(k, "rest")
                published += self.last != before
        elapsed = time.perf_counter() - t0
        self.metrics.backfill_seconds.labels(self.interval).observe(elapsed)
        if published or reason == "jump":
            self.metrics.gaps.labels(reason).inc()
            self.metrics.backfilled.labels(self.interval).inc(published)
            log.info(
                "%s %s: gap after %s (%s): backfilled %d candles over REST in %.2f s",
                self.symbol, self.interval, start - self.step, reason, published, elapsed,
                extra={"symbol": self.symbol, "interval": self.interval, "reason": reason, "backfilled": published},
            )
