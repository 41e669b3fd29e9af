"""The latest chart of a symbol, for a market alert: read back from charts.v1 like any outside
subscriber (XREVRANGE, no consumer group), so every replica finds it without keeping state.

Its PNG is read only from the artefact root (``libs.common.artefacts``: under the root, a size
cap, the PNG signature): a uri on charts.v1 such as ``file:///proc/self/environ`` would otherwise
post the service's secrets to the alert channel. A refused uri is a dead letter (source charts.v1)
and the alert goes out without the image."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

import orjson
import redis.asyncio as aioredis

from libs.common import topics
from libs.common.artefacts import UNREADABLE, ArtefactRefused, ArtefactRoot
from libs.common.bus import DATA_FIELD
from libs.common.bus.framing import entry_id_before, entry_id_key
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
        if entry_id_key(entries[-1][0]) == (0, 0):
            break
        end = entry_id_before(entries[-1][0])
    return fallback


DeadLetter = Callable[[str, Any, str], Awaitable[None]]


async def latest_chart(client: aioredis.Redis, symbol: str, interval: str, lookback: int, root: ArtefactRoot,
                       dead_letter: DeadLetter | None = None) -> Chart | None:
    """The chart (with its PNG when it can still be read: retention may have removed it, and a uri
    the artefact root refuses is never read)."""
    if lookback <= 0:
        return None
    uri = await latest_chart_uri(client, symbol, interval, lookback)
    if uri is None:
        return None
    try:
        png = await asyncio.to_thread(root.read_png, uri)
    except ArtefactRefused as exc:
        png = None
        if exc.kind == UNREADABLE:  # expired or unreachable: the alert goes out without the image
            log.warning("chart %s unreadable (%s); sending the alert without it", uri[:200], exc.reason,
                        extra={"symbol": symbol, "interval": interval})
        elif dead_letter is not None:  # the dead letter logs the one line
            await dead_letter(topics.CHARTS, orjson.dumps({"symbol": symbol, "interval": interval, "uri": uri}),
                              f"alerts refused chart {exc.kind}: {exc.reason}")
        else:
            log.error("alerts refused chart %s: %s", exc.kind, exc.reason)
    return Chart(uri=uri, filename=f"{symbol}-{interval}.png", png=png)
