"""The live ingest loop: websocket messages in, closed candles out to ``klines.v1``, once, in order.

Glue between the websocket client (``wsclient``), the per-stream trackers (``tracker``),
the REST backfill (``rest``) and the exactly-once sink (``sink``). Bad messages go to the
dead-letter stream with one log line; nothing here stops on bad input.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Sequence

import orjson

from libs.common.klines import InvalidKline, Kline, interval_ms, parse_ws_kline, ws_stream_name
from services.ingest.metrics import IngestMetrics
from services.ingest.ratelog import MinuteLog
from services.ingest.rest import RestKlines
from services.ingest.sink import KlineSink
from services.ingest.tracker import StreamTracker

log = logging.getLogger("klinebus.ingest")

WS_SOURCE = "binance-ws"
SILENCE_SCAN_EVERY_MS = 1000  # exchange time between scans for silent streams
DeadLetter = Callable[[str, Any, str], Awaitable[None]]


class IngestEngine:
    def __init__(
        self,
        symbols: Sequence[str],
        intervals: Sequence[str],
        sink: KlineSink,
        rest: RestKlines,
        metrics: IngestMetrics,
        dead_letter: DeadLetter,
        *,
        publish_live: bool = False,
        initial_backfill: int = 0,
    ) -> None:
        self.keys = [(s, i) for s in symbols for i in intervals]
        self.sink = sink
        self.rest = rest
        self.metrics = metrics
        self.dead_letter = dead_letter
        self.publish_live = publish_live
        self.initial_backfill = initial_backfill
        self.trackers: dict[tuple[str, str], StreamTracker] = {}
        self._by_stream: dict[str, StreamTracker] = {}
        self._received: dict[tuple[str, str, int], float] = {}
        self.exchange_now = 0  # latest event time seen on any connection (exchange clock, ms)
        self.messages = 0
        self._last_silence_scan = 0
        self.minute = MinuteLog(log, "ingest", ("published_ws", "published_rest", "duplicates", "dead_letters"))
        # bound once: labels() costs a lock and a dict lookup per message, 12,000 messages per
        # candle period at 4,000 streams
        self._kline_closed = metrics.ws_messages.labels("kline_closed")
        self._kline_update = metrics.ws_messages.labels("kline_update")
        self._klines_out = metrics.events_out.labels("klines.v1")

    @property
    def stream_names(self) -> list[str]:
        return [ws_stream_name(s, i) for s, i in self.keys]

    async def load(self) -> None:
        """Read the last published open_time of every stream (survives restarts)."""
        last = await self.sink.last_open_times()
        for s, i in self.keys:
            t = StreamTracker(
                s, i, last.get((s, i)), self._publish, self._fetch, self.metrics,
                fetch_recent=self._fetch_recent, initial_candles=self.initial_backfill,
                dropped=self._forget_receipt,
            )
            self.trackers[(s, i)] = t
            self._by_stream[ws_stream_name(s, i)] = t
        held = sum(1 for k in self.keys if k in last)
        log.info("ingest: %d streams, %d with a last published candle to continue from", len(self.keys), held)

    async def run_trackers(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for (s, i), t in self.trackers.items():
                tg.create_task(t.run(), name=f"ingest-tracker:{s}:{i}")

    # --- bridges for the tracker ---------------------------------------------------------

    async def _publish(self, ks: Sequence[Kline], source: str) -> list[tuple[bool, int]]:
        results = await self.sink.publish_closed(ks, source)
        appended_count = sum(1 for appended, _ in results if appended)
        if appended_count:
            self._klines_out.inc(appended_count)
        self.minute.add(**{f"published_{source}": appended_count, "duplicates": len(results) - appended_count})
        now = time.perf_counter()
        for k, (appended, _) in zip(ks, results):
            received = self._received.pop(k.key, None)
            if received is not None and appended:
                self.metrics.receive_to_publish.observe(now - received)
        return results

    def _forget_receipt(self, k: Kline) -> None:
        """The tracker dropped ``k`` (a duplicate, or a run left to a backfill retry): its receive
        time would otherwise stay in ``_received`` forever."""
        self._received.pop(k.key, None)

    async def _fetch(self, symbol: str, interval: str, start: int, end: int | None) -> list[Kline]:
        return await self.rest.closed_klines(symbol, interval, start, end)

    async def _fetch_recent(self, symbol: str, interval: str, count: int, end: int | None) -> list[Kline]:
        return await self.rest.recent_closed_klines(symbol, interval, count, end)

    # --- websocket side ------------------------------------------------------------------

    def on_connected(self, streams: Sequence[str], reason: str) -> None:
        if reason == "start":
            reason = "restart"  # state from an earlier run: fill the downtime
        for name in streams:
            t = self._by_stream.get(name)
            if t is not None:
                t.catch_up(reason)

    async def on_message(self, text: bytes | str) -> None:
        self.messages += 1
        try:
            msg = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            self.metrics.ws_messages.labels("invalid").inc()
            self.minute.add(dead_letters=1)
            await self.dead_letter(WS_SOURCE, text, f"malformed JSON: {exc}")
            return
        if isinstance(msg, dict) and "id" in msg and ("result" in msg or "error" in msg):
            if "error" not in msg:
                self.metrics.ws_messages.labels("control").inc()
                return  # SUBSCRIBE acknowledgement
            # The exchange refused a request of ours (rules.WS_ERROR_*): not market data, so no
            # dead letter; say it loudly, it means a bug or a limit (e.g. too many streams).
            self.metrics.ws_messages.labels("error").inc()
            err = msg["error"] if isinstance(msg["error"], dict) else {"msg": msg["error"]}
            log.error("the exchange refused request id %s: code %s: %s", msg.get("id"), err.get("code"), err.get("msg"),
                      extra={"request_id": msg.get("id"), "code": err.get("code")})
            return
        try:
            k = parse_ws_kline(msg)
        except InvalidKline as exc:
            self.metrics.ws_messages.labels("invalid").inc()
            self.minute.add(dead_letters=1)
            await self.dead_letter(WS_SOURCE, text, exc.reason)
            return
        event_time = _event_time(msg)
        if event_time > self.exchange_now:
            self.exchange_now = event_time
        tracker = self.trackers.get((k.symbol, k.interval))
        if tracker is None:
            self.metrics.ws_messages.labels("unexpected").inc()
            return
        if k.closed:
            self._kline_closed.inc()
            self._received.setdefault(k.key, time.perf_counter())
            tracker.closed(k)
        else:
            self._kline_update.inc()
            if self.publish_live:
                await self.sink.publish_live(k)
        self._check_silence()

    def _check_silence(self) -> None:
        """A stream whose candle closed more than an interval ago (exchange clock) without its
        final message is silent: catch it up over REST."""
        now = self.exchange_now
        if now - self._last_silence_scan < SILENCE_SCAN_EVERY_MS:
            return
        self._last_silence_scan = now
        for (s, i), t in self.trackers.items():
            if t.last is None:
                continue
            step = interval_ms(i)
            overdue = now - (t.last + 2 * step)  # the next candle should have closed by last + 2 steps
            if overdue > step // 2 and now - t.last_silence_check >= step and t.idle():
                t.last_silence_check = now
                t.catch_up("silence")

    async def close(self) -> None:
        self.minute.flush()
        await self.rest.close()


def _event_time(msg: dict) -> int:
    data = msg.get("data", msg)
    try:
        return int(data.get("E", 0))
    except (TypeError, ValueError, AttributeError):
        return 0
