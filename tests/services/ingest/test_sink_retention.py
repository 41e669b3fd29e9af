"""klines.v1 keeps at most KLINEBUS_STREAM_RETENTION_MS of time beside the entry cap: the
ingest service's publishes trim the stream with ``MINID ~`` (issue 9: the cap counted entries
only, so at 4,000 streams of 1m candles 200,000 entries was 50 minutes of history)."""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from libs.common import topics
from libs.common.bus import DATA_FIELD
from services.ingest.app import create

from ingest_support import ingest_settings, shipped_candles

HOUR_MS = 3_600_000


class _NoExchange:
    """Settings only: the service is built, not started, so nothing connects to these."""
    ws_url, rest_url = "ws://127.0.0.1:1", "http://127.0.0.1:1"
    candles = {("BTCUSDT", "1m"): []}


async def test_ingest_publishes_trim_klines_by_time(redis_url, tmp_path):
    stream = topics.stream_key(topics.KLINES)
    client = aioredis.Redis.from_url(redis_url)
    runtime = create(ingest_settings(_NoExchange, tmp_path, stream_retention_ms=HOUR_MS), redis_url)
    try:
        node = int((await client.config_get("stream-node-max-entries"))["stream-node-max-entries"])
        two_hours_ago = int(time.time() * 1000) - 2 * HOUR_MS
        for i in range(3 * node):  # entries appended two hours ago (stream ids are milliseconds)
            await client.xadd(stream, {DATA_FIELD: b"{}"}, id=f"{two_hours_ago}-{i + 1}")
        (ks,) = shipped_candles(2, symbols=("BTCUSDT",)).values()
        appended = await runtime.engine.sink.publish_closed(ks, "ws")
        assert [a for a, _ in appended] == [True, True]
        cutoff = int(time.time() * 1000) - HOUR_MS
        # MINID ~ frees whole stream nodes: at most one node of expired entries may remain
        assert len(await client.xrange(stream, "-", f"{cutoff - 1}")) < node
        assert await client.xlen(stream) < node + 2
    finally:
        await runtime.engine.sink.redis.aclose()
        await client.aclose()
