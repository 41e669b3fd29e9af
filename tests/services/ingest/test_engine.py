"""The engine forgets the receive time of every closed candle the tracker lets go."""

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
    """REST that is down: every backfill fails."""

    def __init__(self) -> None:
        self.calls = 0

    async def closed_klines(self, *args, **kw):
        self.calls += 1
        raise RestError("REST get_klines failed: HTTP 503")

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
    rest = _FailingRest()
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
        # a candle after a gap whose backfill fails: the run is dropped and left to the retry
        await engine.on_message(_ws(ks[4]))
        await _until(lambda: metrics.count("backfill_failures", "1m") == 1)
        assert rest.calls == 1
        assert engine._received == {}
    finally:
        workers.cancel()
        await asyncio.gather(workers, return_exceptions=True)
        await redis.aclose()


async def _no_dead_letters(source, raw, reason) -> None:
    raise AssertionError(f"unexpected dead letter: {reason}")
