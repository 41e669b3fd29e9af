"""A stream ingest has never published (first deployment, a new symbol) starts with its newest
closed candles over REST, published in order before its first live candle."""

from __future__ import annotations

import asyncio

import pytest

from services.ingest.app import create

from ingest_support import expected_by_stream, ingest_settings, keys_by_stream, running, shipped_candles, simulator, wait_for_count, wait_for_open_time


async def closed_so_far(sim, ks, at_least: int, timeout: float = 10.0) -> int:
    """Wait until ``at_least`` candles have closed on the simulated clock; return how many have."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while sum(k.close_time < sim.now_ms() for k in ks) < at_least:
        assert loop.time() < deadline, "the simulator clock did not advance"
        await asyncio.sleep(0.01)
    return sum(k.close_time < sim.now_ms() for k in ks)


async def test_new_stream_starts_with_all_history_within_the_limit(redis_url, tmp_path):
    n = 50
    candles = shipped_candles(n, symbols=("BTCUSDT", "ETHUSDT"))
    ks = candles[("BTCUSDT", "1m")]
    async with simulator(candles, speed=1200) as sim:
        sim.begin()  # the exchange runs before ingest exists: these candles are history to it
        before = await closed_so_far(sim, ks, 12)
        runtime = create(ingest_settings(sim, tmp_path), redis_url)  # default: 1000 candles of history
        async with running(runtime):
            await sim.wait_done()
            events = await wait_for_count(redis_url, 2 * n, timeout=20)
    # every closed candle from the very first, once, in order, then the live ones
    assert keys_by_stream(events) == expected_by_stream(candles)
    for symbol in ("BTCUSDT", "ETHUSDT"):
        sources = [e["source"] for e in events if e["symbol"] == symbol]
        assert sources[:before] == ["rest"] * before  # closed before ingest connected: only REST has them
        assert "ws" in sources[before:]


@pytest.mark.parametrize("cap", [5, 0])
async def test_initial_history_is_capped_and_zero_disables_it(redis_url, tmp_path, cap):
    n = 50
    candles = shipped_candles(n, symbols=("BTCUSDT",))
    (ks,) = candles.values()
    opens = [k.open_time for k in ks]
    async with simulator(candles, speed=1200) as sim:
        sim.begin()
        before = await closed_so_far(sim, ks, 12)
        runtime = create(ingest_settings(sim, tmp_path, initial_backfill_candles=cap), redis_url)
        async with running(runtime):
            await wait_for_count(redis_url, 1, timeout=10)
            after = await closed_so_far(sim, ks, 0)  # the first publish came after the history fetch
            await sim.wait_done()
            events = await wait_for_open_time(redis_url, opens[-1], timeout=20)
    got = [e["open_time"] for e in events]
    start = opens.index(got[0])
    assert got == opens[start:]  # contiguous from the first one published, each once, in order
    if cap:
        # the newest `cap` candles closed when ingest connected, from REST, then the later ones
        assert before - cap <= start <= after - cap
        assert [e["source"] for e in events[:cap]] == ["rest"] * cap
    else:
        assert start >= before  # nothing from before ingest connected
        assert {e["source"] for e in events} == {"ws"}
