"""Recent candles of one (symbol, interval) read back from klines.v1.

Services that keep per-stream state (the charts window, the features warm-up when no
archive is configured) rebuild it after a restart from the topic itself, which still
holds the candles (up to its MAXLEN cap).
"""

from __future__ import annotations

from typing import Any

import orjson

from libs.common import topics
from libs.common.bus import DATA_FIELD
from libs.common.contracts import KlineEvent
from libs.common.klines import Kline

PAGE = 1000  # entries per XREVRANGE: large enough to make round trips rare, small enough to stay short


async def recent_candles(client: Any, symbol: str, interval: str, need: int | None, before: int, *,
                         partitions: int = 1) -> list[Kline]:
    """Up to ``need`` (None: all) candles of ``symbol``/``interval`` that opened before
    ``before``, oldest first, scanning klines.v1 backwards from its newest entry (to its oldest
    at most: the stream is capped by MAXLEN, which bounds the scan). Entries that are not valid
    candles are skipped: they were dead-lettered when first consumed. ``partitions``: the
    deployment's count (``bus.partitions``): the key's own partition of klines.v1 is read."""
    key = topics.stream_key(topics.KLINES, topics.partition_of(symbol, interval, partitions))
    field = DATA_FIELD.encode()
    found: dict[int, Kline] = {}
    upper = "+"
    while need is None or len(found) < need:
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
            if need is not None and len(found) >= need:
                break
        last = entries[-1][0]
        upper = "(" + (last.decode() if isinstance(last, bytes) else str(last))  # exclusive: Redis 6.2+
        if len(entries) < PAGE:
            break
    ordered = [found[t] for t in sorted(found)]
    return ordered if need is None else ordered[-need:]
