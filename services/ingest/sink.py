"""Publishing closed candles to ``klines.v1`` exactly once per (symbol, interval, open_time).

``libs.common.bus.OncePerCandle`` appends a candle only if it is newer than the last one
published for its stream, in one atomic Lua step; the last open_time per stream lives beside
the topic, so the guard survives restarts and is shared by replicas. In-progress updates go
to the short, capped ``klines-live.v1`` with a plain XADD (they carry no once-only promise).

**A burst goes through a bounded number of connections.** When hundreds of streams close at
the same moment, every stream's tracker asks to publish at once. Each request joins a queue;
at most ``max_inflight`` flushers (one Redis connection each) take whatever is queued, up to
``batch`` candles, and send it in one ``publish_many`` call (one round trip, one script run).
So 500 streams closing together cost a handful of calls on a handful of connections instead of
500 calls on 500 connections (redis-py's async pool holds 100 by default and raises ``Too many
connections`` past that).

Order per stream holds because a tracker waits for its request before it sends the next one:
a stream has at most one request in the queue, and one request is never split across calls.

Redis trouble (connection refused, timeouts, ``LOADING``, ``READONLY``, ``OOM``, failover) is
waited out here, in place, with capped exponential back-off: one log line when publishing stalls,
one when it resumes, and the ``publish_stalled`` gauge meanwhile. Nothing can reach
``klines.v1`` while Redis refuses writes, and retrying the same batch is safe (the guard keeps
each candle once). Any other error goes back to the caller (the tracker keeps the candles and
retries them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

import redis.exceptions as rex

from libs.common import topics
from libs.common.bus import DATA_FIELD, OncePerCandle
from libs.common.contracts import KlineEvent, LiveKlineEvent
from libs.common.klines import Kline
from services.ingest import rules
from services.ingest.backoff import Backoff

log = logging.getLogger("klinebus.ingest.sink")

# One Lua call holds Redis for its whole run: one REST page's worth (~1-2 ms) at most.
PUBLISH_BATCH = rules.MAX_KLINES_PER_REQUEST
# Publish calls in flight at once (each holds one connection from the pool). Two keep Redis busy
# while the next batch is built; a few more cover a slow round trip. Far below redis-py's 100.
PUBLISH_CONNECTIONS = 4
# Back-off while Redis refuses a publish: first wait, cap.
STALL_FIRST_S = 0.05
STALL_MAX_S = 5.0

# Error replies meaning "not now", whatever class redis-py gave them (a Lua script's errors all
# arrive as a plain ResponseError whose text carries the server's code, e.g. "-OOM ...").
_TRANSIENT_REPLIES = ("LOADING", "READONLY", "OOM", "CLUSTERDOWN", "TRYAGAIN", "MASTERDOWN", "NOREPLICAS", "BUSY", "MISCONF")


def is_transient(exc: BaseException) -> bool:
    """True for Redis or network trouble that ends by itself (wait and send the same batch again);
    False for an error that another try cannot fix (a bad command, a bug)."""
    if isinstance(exc, (rex.ConnectionError, rex.TimeoutError, rex.BusyLoadingError, rex.ReadOnlyError,
                        rex.OutOfMemoryError, rex.ClusterDownError, rex.TryAgainError, OSError,
                        asyncio.TimeoutError)):
        return True
    if isinstance(exc, rex.ResponseError):
        text = str(exc)
        return any(text.startswith(w) or f"-{w}" in text for w in _TRANSIENT_REPLIES)
    return False


@dataclass
class _Request:
    events: list[KlineEvent]
    done: asyncio.Future = field(repr=False)


class KlineSink:
    def __init__(
        self,
        redis: Any,
        maxlen: int,
        live_maxlen: int,
        *,
        metrics: Any = None,
        max_inflight: int = PUBLISH_CONNECTIONS,
        batch: int = PUBLISH_BATCH,
        retention_ms: int = 0,
        partitions: int = 1,
    ) -> None:
        if max_inflight < 1 or batch < 1:
            raise ValueError(f"need max_inflight >= 1 and batch >= 1, got {max_inflight} and {batch}")
        self.redis = redis
        self.live_maxlen = live_maxlen
        self.live_stream = topics.stream_key(topics.KLINES_LIVE)
        self.metrics = metrics
        self.max_inflight = max_inflight
        self.batch = batch
        # retention_ms > 0: klines.v1 also keeps at most that much time (XTRIM MINID ~), beside maxlen
        self._once = OncePerCandle(redis, topics.KLINES, maxlen, retention_ms=retention_ms, partitions=partitions)
        self._queue: deque[_Request] = deque()
        self._flushers: set[asyncio.Task] = set()
        self._stalled_since: float | None = None
        self.calls = 0  # publish_many calls made (tests and the benchmark read it)

    async def last_open_times(self) -> dict[tuple[str, str], int]:
        return await self._once.last_open_times()

    async def publish_closed(self, ks: Sequence[Kline], source: str) -> list[tuple[bool, int]]:
        """Append each of ``ks`` (one stream's candles, ascending), in order, unless a candle at or
        after its open_time was already published for its stream; one ``(appended,
        last_open_time)`` per candle. The candles share calls with other streams' requests."""
        out: list[tuple[bool, int]] = []
        for i in range(0, len(ks), self.batch):
            events = [KlineEvent.from_kline(k, source) for k in ks[i : i + self.batch]]
            out += await self._submit(events)
        return out

    async def _submit(self, events: list[KlineEvent]) -> list[tuple[bool, int]]:
        done: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queue.append(_Request(events, done))
        if len(self._flushers) < self.max_inflight:
            task = asyncio.create_task(self._flush(), name="ingest-publish")
            self._flushers.add(task)
            task.add_done_callback(self._flushers.discard)
        return await done

    def _take(self) -> list[_Request]:
        """Queued requests, oldest first, up to ``batch`` candles (a bigger request goes alone)."""
        taken: list[_Request] = []
        size = 0
        while self._queue:
            req = self._queue[0]
            if req.done.done():  # its caller was cancelled (stopping): nothing to deliver
                self._queue.popleft()
                continue
            if taken and size + len(req.events) > self.batch:
                break
            taken.append(self._queue.popleft())
            size += len(req.events)
        return taken

    async def _flush(self) -> None:
        while True:
            taken = self._take()
            if not taken:
                return
            try:
                replies = await self._send([e for r in taken for e in r.events])
            except asyncio.CancelledError:
                for r in taken:
                    if not r.done.done():
                        r.done.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - handed to each caller, which keeps its candles
                for r in taken:
                    if not r.done.done():
                        r.done.set_exception(exc)
                continue
            at = 0
            for r in taken:
                n = len(r.events)
                if not r.done.done():
                    r.done.set_result(replies[at : at + n])
                at += n

    async def _send(self, events: list[KlineEvent]) -> list[tuple[bool, int]]:
        backoff = Backoff(STALL_FIRST_S, STALL_MAX_S)
        while True:
            try:
                replies = await self._once.publish_many(events)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self._stall(exc)
                await asyncio.sleep(backoff.next_delay())
                continue
            self.calls += 1
            if self.metrics is not None:
                self.metrics.publish_batch.observe(len(events))
            self._resume()
            return replies

    def _stall(self, exc: BaseException) -> None:
        if self.metrics is not None:
            self.metrics.publish_retries.labels(type(exc).__name__).inc()
        if self._stalled_since is None:
            self._stalled_since = time.monotonic()
            if self.metrics is not None:
                self.metrics.publish_stalled.set(1)
            log.warning("publishing to klines.v1 stalled (%s: %s); retrying until Redis takes it",
                        type(exc).__name__, " ".join(str(exc).split())[:200])

    def _resume(self) -> None:
        if self._stalled_since is None:
            return
        log.info("publishing to klines.v1 resumed after %.1f s", time.monotonic() - self._stalled_since)
        self._stalled_since = None
        if self.metrics is not None:
            self.metrics.publish_stalled.set(0)

    async def publish_live(self, k: Kline) -> None:
        payload = LiveKlineEvent.from_kline(k, "ws").to_json()
        await self.redis.xadd(self.live_stream, {DATA_FIELD: payload}, maxlen=self.live_maxlen, approximate=True)

    async def close(self) -> None:
        """Cancel the flushers (stopping); their callers see the cancellation."""
        for task in list(self._flushers):
            task.cancel()
        if self._flushers:
            await asyncio.wait(list(self._flushers))
