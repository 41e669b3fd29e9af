"""The latest chart of a symbol, for a market alert: read back from charts.v1 like any outside
subscriber (XREVRANGE, no consumer group), so every replica finds it without keeping state."""

from __future__ import annotations

import asyncio
import logging

import orjson
import redis.asyncio as aioredis

from libs.common import topics
from libs.common.bus import DATA_FIELD
from services.alerts.notification import Chart

log = logging.getLogger("klinebus.alerts.charts")
PAGE = 200
PREFERRED_PRESET = "analysis"  # the chart with indicator panels a person reads; classifier224 is for models


async def latest_chart_uri(client: aioredis.Redis, symbol: str, interval: str, lookback: int) -> str | None:
    """The newest chart of (symbol, interval) among the last ``lookback`` entries of charts.v1; an
    analysis chart if there is one, else any."""
    key = topics.stream_key(topics.CHARTS)
    end, seen, fallback = "+", 0, None
    while seen < lookback:
        entries = await client.xrevrange(key, max=end, min="-", count=min(PAGE, lookback - seen))
        if not entries:
            break
        for entry_id, fields in entries:
            seen += 1
            try:
                doc = orjson.loads(fields.get(DATA_FIELD.encode(), b"{}"))
            except orjson.JSONDecodeError:
                continue
            if doc.get("symbol") == symbol and doc.get("interval") == interval and doc.get("uri"):
                if doc.get("preset") == PREFERRED_PRESET:
                    return doc["uri"]
                fallback = fallback or doc["uri"]
        last = entries[-1][0].decode()
        ms, seq = (int(p) for p in last.split("-"))
        end = f"{ms}-{seq - 1}" if seq > 0 else f"{ms - 1}"
        if ms == 0 and seq == 0:
            break
    return fallback


def _read(uri: str) -> bytes:
    import fsspec

    with fsspec.open(uri, "rb") as fh:
        return fh.read()


async def latest_chart(client: aioredis.Redis, symbol: str, interval: str, lookback: int) -> Chart | None:
    """The chart (with its PNG when it can still be read: retention may have removed it)."""
    if lookback <= 0:
        return None
    uri = await latest_chart_uri(client, symbol, interval, lookback)
    if uri is None:
        return None
    try:
        png = await asyncio.to_thread(_read, uri)
    except Exception as exc:  # noqa: BLE001 - expired or unreachable: the alert goes out without the image
        log.warning("chart %s unreadable (%s); sending the alert without it", uri, type(exc).__name__,
                    extra={"symbol": symbol, "interval": interval})
        png = None
    return Chart(uri=uri, filename=f"{symbol}-{interval}.png", png=png)
