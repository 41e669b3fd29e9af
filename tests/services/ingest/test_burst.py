"""Many streams closing at the same moment: nothing lost, nothing doubled, with default settings.

Before the sink published through a bounded number of connections, every stream's tracker took
its own connection from redis-py's async pool (100 by default): past 100 streams closing together
the pool raised ``Too many connections`` and a stream whose very first publish failed never
retried it, so its candles never reached klines.v1.
"""

from __future__ import annotations

from services.ingest.app import create
from services.ingest.simulator import many_streams

from ingest_support import (
    begin_when_connected, expected_by_stream, ingest_settings, keys_by_stream, running, shipped_candles, simulator,
    wait_for_count,
)

STREAMS = 500
CANDLES = 3


async def test_500_streams_closing_together_each_candle_exactly_once(redis_url, tmp_path):
    candles = many_streams(shipped_candles(CANDLES), STREAMS)
    async with simulator(candles, speed=30, updates_per_candle=1) as sim:
        # default settings: no max_connections in the URL, the default initial backfill and pool
        runtime = create(ingest_settings(sim, tmp_path), redis_url)
        async with running(runtime):
            await begin_when_connected(sim, clients=len(runtime.ws_client.chunks), timeout=30)
            await sim.wait_done()
            events = await wait_for_count(redis_url, STREAMS * CANDLES, timeout=90)
    got = keys_by_stream(events)
    want = expected_by_stream(candles)
    missing = {k: sorted(set(v) - set(got.get(k, []))) for k, v in want.items() if got.get(k) != v}
    assert not missing, f"{len(missing)} streams differ, e.g. {list(missing.items())[:3]}"
    assert len(events) == STREAMS * CANDLES
    # a burst shares publish calls (pipelined through the guard's publish_many), not one per candle
    assert runtime.engine.sink.calls < STREAMS
