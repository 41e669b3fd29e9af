"""Per-stream ordering and gap repair.

Each (symbol, interval) has one worker that handles, in arrival order, the closed candles
from the websocket and "catch up" requests (after a reconnect, a rotation, a
``serverShutdown`` or a silent stretch). A closed candle more than one interval after the
last published one is a gap: the missing candles are fetched over REST and published, in
order, before it. Because one worker per stream does all of this, live candles that arrive
during a backfill wait behind it and nothing is published out of order.

The first time a stream is seen (no last published open_time: a first deployment, a newly
added symbol or interval) it starts with the newest ``initial_candles`` closed candles over
REST, published before its first live candle, so indicators downstream can warm up at once.

Closed candles that queued up while the worker was busy are published together (one Redis
call for the run), in order; a gap inside the run splits it around the backfill.

The tracker knows nothing of Redis or HTTP: it gets ``publish``, ``fetch`` and
``fetch_recent`` callables.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

from libs.common.klines import Kline, interval_ms
from services.ingest.backoff import Backoff

log = logging.getLogger("klinebus.ingest.tracker")

# publish(candles, source) -> one (appended, last_open_time) per candle, in order
Publish = Callable[[Sequence[Kline], str], Awaitable[list[tuple[bool, int]]]]
# fetch(symbol, interval, start, end) -> closed candles with start <= open_time <= end (end None: now)
Fetch = Callable[[str, str, int, "int | None"], Awaitable[list[Kline]]]
# fetch_recent(symbol, interval, count, end) -> the newest ``count`` closed candles up to end (None: now)
FetchRecent = Callable[[str, str, int, "int | None"], Awaitable[list[Kline]]]
# dropped(candle): a closed candle the tracker let go without publishing it itself
# (a duplicate, or one of a run whose gap backfill failed: the retry fetches it over REST)
Dropped = Callable[[Kline], None]

# Pause before retrying a failed backfill: doubled per consecutive failure, with jitter, capped
# well under a minute so a REST outage is bridged soon after it ends.
RETRY_INITIAL_S = 1.0
RETRY_MAX_S = 30.0

INITIAL = "initial"  # gap reason of a new stream's first backfill
HELD = "held"  # a retry of the candles a failed run left (published from memory, gaps over REST)


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
        *,
        fetch_recent: FetchRecent | None = None,
        initial_candles: int = 0,
        dropped: Dropped | None = None,
        retry_initial_s: float = RETRY_INITIAL_S,
        retry_max_s: float = RETRY_MAX_S,
    ) -> None:
        if initial_candles and fetch_recent is None:
            raise ValueError("initial_candles needs fetch_recent")
        self.symbol = symbol
        self.interval = interval
        self.step = interval_ms(interval)
        self.last = last_open_time
        self._publish = publish
        self._fetch = fetch
        self._fetch_recent = fetch_recent
        self.initial_candles = initial_candles
        # A stream with a last published candle continues from it; a new one starts with history.
        self._needs_initial = last_open_time is None and initial_candles > 0
        self.metrics = metrics
        self._queue: asyncio.Queue[Kline | CatchUp] = asyncio.Queue()
        self._pending_catch_up: str | None = None
        self.last_silence_check = 0  # exchange ms of the last silence-triggered catch-up
        self._dropped = dropped or (lambda k: None)
        self._retry = Backoff(retry_initial_s, retry_max_s)
        self._held: list[Kline] = []  # closed candles not yet published (ascending open_time)
        self._reported_held = 0  # this stream's part of the held_candles gauge (a sum over streams)
        self._published = {source: metrics.published.labels(source) for source in ("ws", "rest")}

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
            items = [await self._queue.get()]
            while not self._queue.empty():
                items.append(self._queue.get_nowait())
            for work in _runs(items):
                try:
                    if isinstance(work, CatchUp):
                        if work.reason == HELD:  # only the candles a failed run left: no REST needed
                            await self._on_closed([])
                            continue
                        self._pending_catch_up = None
                        if self._held:  # a run whose publish failed goes first, before anything newer
                            await self._on_closed([])
                        await self._backfill(work.reason, until=None)
                    else:
                        await self._on_closed(work)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - a failed publish or backfill must not kill the stream
                    # one line per failing series (the first), not one per retry
                    level = logging.WARNING if self._retry.attempt == 0 else logging.DEBUG
                    log.log(level, "%s %s: %s: %s; retrying with back-off", self.symbol, self.interval,
                            type(exc).__name__, exc, exc_info=True)
                    # The candles not yet published stay in ``_held`` (published first on the retry);
                    # a failed catch-up (restart, reconnect, rotation, silence) is retried too:
                    # otherwise its gap would wait for the next live candle (an hour on 1h).
                    self.metrics.backfill_failures.labels(self.interval).inc()
                    await asyncio.sleep(self._retry.next_delay())
                    if isinstance(work, CatchUp) and work.reason != HELD:
                        self.catch_up("retry")
                    else:
                        self._queue.put_nowait(CatchUp(HELD))
                else:
                    self._retry.reset()

    async def _on_closed(self, ks: list[Kline]) -> None:
        """Publish a run of closed candles in order, backfilling any gap before a candle first.

        Candles of an earlier run whose publish failed (``_held``) go first. A candle stays held
        until it is published, so a failure at any step (the initial backfill, a gap backfill, the
        publish itself, even the very first publish of a new stream) loses nothing: the retry
        starts again from the first unpublished candle."""
        try:
            await self._publish_held(ks)
        finally:
            self._report_held()

    def _report_held(self) -> None:
        """This stream's candles still held after a run (its publish failed) into the gauge shared
        by every stream, as a change: streams add up instead of the last writer's count standing
        for all of them, and a close published at once (held only while it is sent) writes nothing."""
        held = len(self._held)
        if held != self._reported_held:
            self.metrics.held_candles.inc(held - self._reported_held)
            self._reported_held = held

    async def _publish_held(self, ks: list[Kline]) -> None:
        if ks:
            merged = {k.open_time: k for k in self._held}
            for k in ks:
                if k.open_time in merged:  # sent twice while the first copy waits
                    self.metrics.duplicates.labels("klines.v1").inc()
                    self._dropped(k)
                else:
                    merged[k.open_time] = k
            self._held = [merged[t] for t in sorted(merged)]
        while self._held:
            k = self._held[0]
            if self._needs_initial:
                await self._backfill(INITIAL, until=k.open_time - 1)
                continue
            if self.last is not None and k.open_time <= self.last:
                self.metrics.duplicates.labels("klines.v1").inc()
                self._dropped(k)
                self._held.pop(0)
                continue
            if self.last is not None and k.open_time > self.last + self.step:
                await self._backfill("jump", until=k.open_time - 1)
            n = 1  # k and the held candles that follow it without a gap go in one call
            while n < len(self._held) and self._held[n].open_time == self._held[n - 1].open_time + self.step:
                n += 1
            await self._emit(self._held[:n], "ws")
            del self._held[:n]

    async def _emit(self, ks: Sequence[Kline], source: str) -> int:
        """Publish ``ks`` (ascending open_time); returns how many were appended."""
        if not ks:
            return 0
        appended_count = 0
        for appended, last in await self._publish(ks, source):
            if appended:
                appended_count += 1
            self.last = last if self.last is None else max(self.last, last)
        (self._published.get(source) or self.metrics.published.labels(source)).inc(appended_count)
        if appended_count < len(ks):
            self.metrics.duplicates.labels("klines.v1").inc(len(ks) - appended_count)
        return appended_count

    async def _backfill(self, reason: str, until: int | None) -> None:
        t0 = time.perf_counter()
        if self.last is None:
            if not self._needs_initial:
                return  # nothing published yet and no history wanted: there is no gap to speak of
            reason = INITIAL
            fetched = await self._fetch_recent(self.symbol, self.interval, self.initial_candles, until)  # type: ignore[misc]
            after = None
        else:
            self._needs_initial = False
            after = self.last
            if until is not None and until < after + self.step:
                return
            fetched = await self._fetch(self.symbol, self.interval, after + self.step, until)
        newer = [k for k in fetched if self.last is None or k.open_time > self.last]
        published = await self._emit(newer, "rest")
        # Cleared only once the history is out: a failed first publish retries the whole start.
        self._needs_initial = False
        elapsed = time.perf_counter() - t0
        self.metrics.backfill_seconds.labels(self.interval).observe(elapsed)
        if published or reason in ("jump", INITIAL):
            self.metrics.gaps.labels(reason).inc()
            self.metrics.backfilled.labels(self.interval).inc(published)
            # DEBUG: a reconnect backfills every stream at once; the engine's minute line counts them
            log.debug(
                "%s %s: %s (%s): backfilled %d candles over REST in %.2f s",
                self.symbol, self.interval,
                "new stream, newest history" if after is None else f"gap after {after}",
                reason, published, elapsed,
                extra={"symbol": self.symbol, "interval": self.interval, "reason": reason, "backfilled": published},
            )


def _runs(items: list[Kline | CatchUp]) -> list[list[Kline] | CatchUp]:
    """Consecutive closed candles grouped into one run; catch-ups stay where they were queued."""
    out: list[list[Kline] | CatchUp] = []
    for item in items:
        if isinstance(item, CatchUp):
            out.append(item)
        elif out and isinstance(out[-1], list):
            out[-1].append(item)
        else:
            out.append([item])
    return out
