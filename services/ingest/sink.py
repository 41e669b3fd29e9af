"""Publishing closed candles to ``klines.v1`` exactly once per (symbol, interval, open_time).

``libs.common.bus.OncePerCandle`` appends a candle only if it is newer than the last one
published for its stream, in one atomic Lua step; the last open_time per stream lives beside
the topic, so the guard survives restarts and is shared by replicas. In-progress updates go
to the short, capped ``klines-live.v1`` with a plain XADD (they carry no once-only promise).
"""

from __future__ import annotations

from typing import Any

from libs.common import topics
from libs.common.bus import DATA_FIELD, OncePerCandle
from libs.common.contracts import KlineEvent, LiveKlineEvent
from libs.common.klines import Kline


class KlineSink:
    def __init__(self, redis: Any, maxlen: int, live_maxlen: int) -> None:
        self.redis = redis
        self.live_maxlen = live_maxlen
        self.live_stream = topics.stream_key(topics.KLINES_LIVE)
        self._once = OncePerCandle(redis, topics.KLINES, maxlen)

    async def last_open_times(self) -> dict[tuple[str, str], int]:
        return await self._once.last_open_times()

    async def publish_closed(self, k: Kline, source: str) -> tuple[bool, int]:
        """Append ``k`` unless a candle at or after its open_time was already published."""
        return await self._once.publish(KlineEvent.from_kline(k, source))

    async def publish_live(self, k: Kline) -> None:
        payload = LiveKlineEvent.from_kline(k, "ws").to_json()
        await self.redis.xadd(self.live_stream, {DATA_FIELD: payload}, maxlen=self.live_maxlen, approximate=True)
