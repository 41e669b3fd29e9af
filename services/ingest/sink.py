"""Publishing closed candles to ``klines.v1`` exactly once per (symbol, interval, open_time).

``libs.common.bus.OncePerCandle`` appends a candle only if it is newer than the last one
published for its stream, in one atomic Lua step; the last open_time per stream lives beside
the topic, so the guard survives restarts and is shared by replicas. In-progress updates go
to the short, capped ``klines-live.v1`` with a plain XADD (they carry no once-only promise).
"""

from __future__ import annotations

from typing import Any, Sequence

from libs.common import topics
from libs.common.bus import DATA_FIELD, OncePerCandle
from libs.common.contracts import KlineEvent, LiveKlineEvent
from libs.common.klines import Kline
from services.ingest import rules

# One Lua call holds Redis for its whole run: one REST page's worth (~1-2 ms) at most.
PUBLISH_BATCH = rules.MAX_KLINES_PER_REQUEST


class KlineSink:
    def __init__(self, redis: Any, maxlen: int, live_maxlen: int) -> None:
        self.redis = redis
        self.live_maxlen = live_maxlen
        self.live_stream = topics.stream_key(topics.KLINES_LIVE)
        self._once = OncePerCandle(redis, topics.KLINES, maxlen)

    async def last_open_times(self) -> dict[tuple[str, str], int]:
        return await self._once.last_open_times()

    async def publish_closed(self, ks: Sequence[Kline], source: str) -> list[tuple[bool, int]]:
        """Append each of ``ks``, in order, unless a candle at or after its open_time was already
        published for its stream; one ``(appended, last_open_time)`` per candle. Up to
        ``PUBLISH_BATCH`` candles go in one Redis call (a backfill page), not one call each."""
        out: list[tuple[bool, int]] = []
        for i in range(0, len(ks), PUBLISH_BATCH):
            events = [KlineEvent.from_kline(k, source) for k in ks[i : i + PUBLISH_BATCH]]
            out += await self._once.publish_many(events)
        return out

    async def publish_live(self, k: Kline) -> None:
        payload = LiveKlineEvent.from_kline(k, "ws").to_json()
        await self.redis.xadd(self.live_stream, {DATA_FIELD: payload}, maxlen=self.live_maxlen, approximate=True)
