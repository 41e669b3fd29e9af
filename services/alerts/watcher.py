"""Freshness and close-to-publish lag of the candle topics, measured from outside the producers.

A producer that has died cannot report that it is late, so the on-call service reads the topics
the way any subscriber would (XREAD from a cursor, no consumer group, nothing acknowledged) and
exports, per topic: the lag from a candle's close to its entry on the stream (the entry id's
milliseconds are the Redis server's clock at XADD), the close time of the newest candle of each
(symbol, interval), how many whole intervals that is behind now, and candles appended after a
missing one (a hole that was published instead of healed)."""

from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

import orjson
import redis.asyncio as aioredis

from libs.common import topics
from libs.common.bus import DATA_FIELD
from libs.common.bus.framing import entry_id_before, entry_id_key
from libs.common.klines import INTERVAL_MS

log = logging.getLogger("klinebus.alerts.watcher")
READ_COUNT = 1000
PAGE = 500
# Topics with one event per candle in open_time order per (symbol, interval): a jump is a hole.
ORDERED_TOPICS = frozenset({topics.KLINES, topics.FEATURES})
LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600, 6 * 3600, 86_400)


class WatcherMetrics:
    def __init__(self, m) -> None:
        self.lag = m.histogram(
            "close_to_publish_seconds", "From a candle's close to its entry on the topic (entry id time)",
            ["topic", "interval"], buckets=LAG_BUCKETS,
        )
        self.last_close = m.gauge(
            "stream_last_close_time_seconds", "Close time of the newest candle seen on the topic",
            ["topic", "symbol", "interval"],
        )
        self.behind = m.gauge(
            "stream_candles_behind", "Whole intervals between now and the newest candle's close (0: fresh)",
            ["topic", "symbol", "interval"],
        )
        self.entries = m.counter("stream_entries_total", "Entries read from the watched topic", ["topic"])
        self.holes = m.counter(
            "stream_holes_total", "Candles appended after a missing one (a gap published, not healed)",
            ["topic", "interval"],
        )


class StreamWatcher:
    def __init__(
        self, client: aioredis.Redis, watched: Sequence[str], metrics: WatcherMetrics, history: int = 5000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.topics = list(watched)
        self.m = metrics
        self.history = history
        self.clock = clock
        self.cursor: dict[str, str] = {}
        self.last_open: dict[tuple[str, str, str], int] = {}

    async def prime(self) -> None:
        """Learn each stream's newest candle from the last ``history`` entries, without counting
        their lag (they were published before this process looked)."""
        for topic in self.topics:
            key = topics.stream_key(topic)
            newest = await self.client.xrevrange(key, count=1)
            self.cursor[topic] = newest[0][0].decode() if newest else "0-0"
            end, seen, batch = "+", 0, []
            while seen < self.history:
                entries = await self.client.xrevrange(key, max=end, count=min(PAGE, self.history - seen))
                if not entries:
                    break
                batch.extend(entries)
                seen += len(entries)
                if entry_id_key(entries[-1][0]) == (0, 0):
                    break
                end = entry_id_before(entries[-1][0])
            for entry_id, fields in reversed(batch):
                self._observe(topic, entry_id.decode(), fields, live=False)

    async def poll(self) -> int:
        """Read what was appended since the last poll; returns how many entries."""
        total = 0
        for topic in self.topics:
            key = topics.stream_key(topic)
            while True:
                reply = await self.client.xread({key: self.cursor.get(topic, "0-0")}, count=READ_COUNT)
                entries = reply[0][1] if reply else []
                for entry_id, fields in entries:
                    eid = entry_id.decode()
                    self.cursor[topic] = eid
                    self._observe(topic, eid, fields, live=True)
                total += len(entries)
                if len(entries) < READ_COUNT:
                    break
        return total

    def _observe(self, topic: str, entry_id: str, fields: dict, live: bool) -> None:
        try:
            doc = orjson.loads(fields.get(DATA_FIELD.encode(), b""))
            symbol, interval, open_time = str(doc["symbol"]), str(doc["interval"]), int(doc["open_time"])
            step = INTERVAL_MS[interval]
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return  # not a candle event: its consumers dead-letter it; nothing to measure
        close_ms = open_time + step
        if live:
            self.m.entries.labels(topic).inc()
            published_ms = int(entry_id.split("-")[0])
            self.m.lag.labels(topic, interval).observe(max(0.0, (published_ms - close_ms) / 1000))
        key = (topic, symbol, interval)
        prev = self.last_open.get(key)
        if live and prev is not None and topic in ORDERED_TOPICS and open_time > prev + step:
            self.m.holes.labels(topic, interval).inc()
            log.warning("%s: %s %s jumped from %d to %d (%d candles missing)", topic, symbol, interval, prev,
                        open_time, (open_time - prev) // step - 1,
                        extra={"symbol": symbol, "interval": interval, "open_time": open_time, "topic": topic})
        if prev is None or open_time > prev:
            self.last_open[key] = open_time
            self.m.last_close.labels(topic, symbol, interval).set(close_ms / 1000)
            if prev is None:
                self.m.behind.labels(topic, symbol, interval).set_function(self._behind(key, step))

    def _behind(self, key: tuple[str, str, str], step: int) -> Callable[[], float]:
        def behind() -> float:
            close_ms = self.last_open[key] + step
            return float(max(0, int(self.clock() * 1000 - close_ms) // step))

        return behind
