"""Recent candles of one (symbol, interval) read back from klines.v1, newest first.

The charts service keeps its candle history in memory only; after a restart it
would chart nothing until a full window of new candles had arrived (60 hours
for 1h charts). klines.v1 itself still holds those candles, so on a stream's
first candle the service reads them back from the topic's stream.
"""

from __future__ import annotations

from typing import Any

import orjson

from libs.common import topics
from libs.common.bus import DATA_FIELD
from libs.common.contracts import KlineEvent
from libs.common.klines import Kline

PAGE = 1000  # entries per XREVRANGE: large enough to make round trips rare, small enough to stay short


async def recent_candles(client: Any, symbol: str, interval: str, need: int, before: int) -> list[Kline]:
    """Up to ``need`` candles of ``symbol``/``interval`` that opened before ``before``,
    oldest first, scanning klines.v1 backwards from its newest entry (to its oldest at most:
    the stream is capped by MAXLEN, which bounds the scan)."""
    key = topics.stream_key(topics.KLINES)
    field = DATA_FIELD.encode()
    found: dict[int, Kline] = {}
    upper = "+"
    while len(found) < need:
        entries = await client.xrevrange(key, max=upper, min="-", count=PAGE)
        if not entries:
            break
        for entry_id, fields in entries:
            raw = fields.get(field)
            if raw is None:
                continue
            try:
                d = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue  # a malformed entry was dead-lettered when it was consumed
            if not isinstance(d, dict) or d.get("symbol") != symbol or d.get("interval") != interval:
                continue
            if not isinstance(d.get("open_time"), int) or d["open_time"] >= before or d["open_time"] in found:
                continue
            try:
                found[d["open_time"]] = KlineEvent.model_validate(d).to_kline()  # klines.v1: closed candles only
            except ValueError:
                continue
            if len(found) >= need:
                break
        last = entries[-1][0]
        upper = "(" + (last.decode() if isinstance(last, bytes) else str(last))  # exclusive: Redis 6.2+
        if len(entries) < PAGE:
            break
    return [found[t] for t in sorted(found)][-need:]
