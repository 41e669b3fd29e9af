"""The stream watcher reads candle topics like an outside subscriber and measures freshness,
close-to-publish lag and holes; entries are written with explicit ids so publish times are known."""

from __future__ import annotations

import orjson
from prometheus_client import CollectorRegistry

from libs.common import topics
from libs.common.bus import DATA_FIELD, redis_client
from libs.common.telemetry import ServiceMetrics
from services.alerts.watcher import StreamWatcher, WatcherMetrics

MIN = 60_000
T = 1_700_000_040_000 - 1_700_000_040_000 % MIN  # a minute boundary


async def _xadd(client, topic: str, entry_ms: int, symbol: str, open_time: int, interval: str = "1m") -> None:
    doc = {"symbol": symbol, "interval": interval, "open_time": open_time}
    await client.xadd(topics.stream_key(topic), {DATA_FIELD: orjson.dumps(doc)}, id=f"{entry_ms}-0")


async def test_lag_freshness_and_holes_from_the_streams(redis_url):
    client = redis_client(redis_url)
    registry = CollectorRegistry()
    now = {"s": (T + 10 * MIN) / 1000}
    watcher = StreamWatcher(client, [topics.KLINES], WatcherMetrics(ServiceMetrics("alerts", registry)),
                            history=100, clock=lambda: now["s"])
    try:
        await _xadd(client, topics.KLINES, T + 1_000, "BTCUSDT", T - MIN)  # before the watcher looked
        await watcher.prime()
        await _xadd(client, topics.KLINES, T + MIN + 2_500, "BTCUSDT", T)  # closed at T+1m, on the stream 2.5 s later
        await _xadd(client, topics.KLINES, T + MIN + 2_600, "ETHUSDT", T)
        await _xadd(client, topics.KLINES, T + 4 * MIN + 500, "BTCUSDT", T + 3 * MIN)  # two candles missing
        client_reads = await watcher.poll()
    finally:
        await client.aclose()

    def v(name, **labels):
        return registry.get_sample_value(f"klinebus_alerts_{name}", labels)

    assert client_reads == 3
    assert v("stream_entries_total", topic="klines.v1") == 3  # the primed entry is not counted
    assert v("close_to_publish_seconds_count", topic="klines.v1", interval="1m") == 3
    assert v("close_to_publish_seconds_sum", topic="klines.v1", interval="1m") == 2.5 + 2.6 + 0.5
    assert v("close_to_publish_seconds_bucket", topic="klines.v1", interval="1m", le="0.5") == 1
    assert v("stream_holes_total", topic="klines.v1", interval="1m") == 1
    assert v("stream_last_close_time_seconds", topic="klines.v1", symbol="BTCUSDT", interval="1m") == (T + 4 * MIN) / 1000
    # now = T+10m; BTCUSDT's newest candle closed at T+4m: 6 whole minutes behind; ETHUSDT's at T+1m: 9
    assert v("stream_candles_behind", topic="klines.v1", symbol="BTCUSDT", interval="1m") == 6
    assert v("stream_candles_behind", topic="klines.v1", symbol="ETHUSDT", interval="1m") == 9
    now["s"] = (T + 4 * MIN + 30_000) / 1000
    assert v("stream_candles_behind", topic="klines.v1", symbol="BTCUSDT", interval="1m") == 0


async def test_entries_that_are_not_candles_are_skipped(redis_url):
    client = redis_client(redis_url)
    registry = CollectorRegistry()
    watcher = StreamWatcher(client, [topics.FEATURES], WatcherMetrics(ServiceMetrics("alerts", registry)), history=10)
    try:
        await watcher.prime()
        await _xadd(client, topics.FEATURES, T + MIN + 1_000, "BTCUSDT", T)
        await client.xadd(topics.stream_key(topics.FEATURES), {DATA_FIELD: b"not json"})
        await client.xadd(topics.stream_key(topics.FEATURES), {DATA_FIELD: b'{"symbol": "BTCUSDT", "interval": "7m", "open_time": 1}'})
        assert await watcher.poll() == 3
    finally:
        await client.aclose()
    assert registry.get_sample_value("klinebus_alerts_stream_entries_total", {"topic": "features.v1"}) == 1
