"""The engine forgets the receive time of every closed candle the tracker lets go, and keeps the
one of a candle held for a retry until it is published."""

from __future__ import annotations

import asyncio
import time

import orjson
from ingest_support import shipped_candles
from metrics_fake import RecordingMetrics

from libs.common.bus import redis_client
from libs.common.klines import kline_to_ws_payload, ws_stream_name
from services.ingest.engine import IngestEngine
from services.ingest.rest import RestError
from services.ingest.sink import KlineSink


class _FailingRest:
    """REST that is down for its first ``failures`` backfills, then serves ``candles``."""

    def __init__(self, candles=(), failures: int = 1) -> None:
        self.calls = 0
        self.candles = list(candles)
        self.failures = failures

    async def closed_klines(self, symbol, interval, start, end=None):
        self.calls += 1
        if self.calls <= self.failures:
            raise RestError("REST get_klines failed: HTTP 503")
        return [k for k in self.candles if start <= k.open_time and (end is None or k.open_time <= end)]

    async def close(self) -> None:
        pass


def _ws(k) -> bytes:
    return orjson.dumps({"stream": ws_stream_name(k.symbol, k.interval), "data": kline_to_ws_payload(k)})


async def _until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_duplicates_and_dropped_runs_leave_no_receive_times_behind(redis_url):
    (ks,) = shipped_candles(6, symbols=("BTCUSDT",)).values()
    redis = redis_client(redis_url)
    metrics = RecordingMetrics()
    rest = _FailingRest(ks[:5])  # what the exchange has closed so far
    engine = IngestEngine(["BTCUSDT"], ["1m"], KlineSink(redis, 1000, 100), rest, metrics, _no_dead_letters)
    await engine.load()
    tracker = engine.trackers[("BTCUSDT", "1m")]
    workers = asyncio.create_task(engine.run_trackers())
    try:
        for k in ks[:2]:
            await engine.on_message(_ws(k))
        await _until(lambda: tracker.last == ks[1].open_time)
        # the exchange (or an overlapping connection) sends them again: the tracker drops them
        for k in (ks[0], ks[1], ks[1]):
            await engine.on_message(_ws(k))
        await _until(lambda: metrics.count("duplicates", "klines.v1") == 3)
        assert engine._received == {}
        # a candle after a gap whose backfill fails: the candle is held for the retry (its receive
        # time too), and once the retried backfill has filled the gap it is published and forgotten
        await engine.on_message(_ws(ks[4]))
        await _until(lambda: metrics.count("backfill_failures", "1m") == 1)
        assert rest.calls == 1
        assert list(engine._received) == [ks[4].key]
        await _until(lambda: tracker.last == ks[4].open_time)
        assert rest.calls == 2
        assert engine._received == {}
    finally:
        workers.cancel()
        await asyncio.gather(workers, return_exceptions=True)
        await redis.aclose()


async def _no_dead_letters(source, raw, reason) -> None:
    raise AssertionError(f"unexpected dead letter: {reason}")


async def test_an_exchange_error_reply_is_counted_and_logged_not_dead_lettered(redis_url, caplog):
    redis = redis_client(redis_url)
    metrics = RecordingMetrics()
    engine = IngestEngine(["BTCUSDT"], ["1m"], KlineSink(redis, 1000, 100), _FailingRest(), metrics, _no_dead_letters)
    try:
        await engine.on_message(b'{"result":null,"id":1}')
        await engine.on_message(b'{"error":{"code":4,"msg":"Too many subscriptions"},"id":2}')
    finally:
        await redis.aclose()
    assert metrics.count("ws_messages", "control") == 1
    assert metrics.count("ws_messages", "error") == 1
    assert any(r.levelname == "ERROR" and "Too many subscriptions" in r.getMessage() for r in caplog.records)
