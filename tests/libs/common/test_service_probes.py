"""A service's probes tell the truth about its consumers (issue 9: on NOGROUP faststream stopped
the subscriber while /healthz and /readyz, constants set at start, stayed green).

A consumer group deleted under a running service is recreated and the service keeps consuming
with its probes green; a consumer that dies of something it cannot wait out fails /healthz."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
import redis.asyncio as aioredis

from libs.common import topics
from libs.common.bus import DATA_FIELD
from libs.common.contracts import KlineEvent
from libs.common.service import ServiceRuntime
from libs.common.settings import ServiceSettings

KEY = topics.stream_key(topics.KLINES)
BATCH = 5
pytestmark = pytest.mark.timeout(120)


def kline(i: int) -> KlineEvent:
    t = i * 60_000
    return KlineEvent(symbol="BTCUSDT", interval="1m", open_time=t, close_time=t + 59_999,
                      open=100.0, high=101.0, low=99.0, close=100.5, volume=3.0)


def service(redis_url: str, seen: list[int], gate: asyncio.Event | None = None) -> ServiceRuntime:
    runtime = ServiceRuntime("probed", ServiceSettings(http_host="127.0.0.1", http_port=0, consumer_name="c"),
                             redis_url)

    @runtime.bus.ordered(topics.KLINES, KlineEvent, max_records=BATCH)
    async def handle(event: KlineEvent, entry_id: str) -> None:
        if gate is not None:
            await gate.wait()
        seen.append(event.open_time // 60_000)

    return runtime


async def scrape(runtime: ServiceRuntime) -> dict[str, float]:
    """This service's group samples on /metrics, by metric name."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{runtime.http_port}/metrics") as reply:
            text = await reply.text()
    out = {}
    for line in text.splitlines():
        if line.startswith("klinebus_bus_group_") and 'group="probed"' in line and 'topic="klines.v1"' in line:
            out[line.split("{", 1)[0]] = float(line.rsplit(" ", 1)[1])
    return out


async def probes(runtime: ServiceRuntime) -> tuple[int, int]:
    async with aiohttp.ClientSession() as http:
        codes = []
        for path in ("/healthz", "/readyz"):
            async with http.get(f"http://127.0.0.1:{runtime.http_port}{path}") as reply:
                codes.append(reply.status)
    return codes[0], codes[1]


async def until(check, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_a_group_deleted_under_a_running_service_is_recreated_and_consuming_goes_on(redis_url):
    seen: list[int] = []
    runtime = service(redis_url, seen)
    client = aioredis.Redis.from_url(redis_url)
    for i in range(5):
        await client.xadd(KEY, {DATA_FIELD: kline(i).to_json()})
    await runtime.start()
    try:
        async def handled(n: int):
            return len(seen) >= n
        await until(lambda: handled(5))
        assert await probes(runtime) == (200, 200)
        await client.xgroup_destroy(KEY, "probed")
        for i in range(5, 10):
            await client.xadd(KEY, {DATA_FIELD: kline(i).to_json()})
        await until(lambda: handled(10))
        assert await probes(runtime) == (200, 200)
    finally:
        await runtime.stop()
        await client.aclose()
    assert seen == list(range(10))


async def test_a_consumer_that_dies_fails_healthz(redis_url):
    seen: list[int] = []
    runtime = service(redis_url, seen)
    client = aioredis.Redis.from_url(redis_url)
    await client.xadd(KEY, {DATA_FIELD: kline(0).to_json()})
    await runtime.start()
    try:
        async def handled():
            return seen == [0]
        await until(handled)
        assert await probes(runtime) == (200, 200)
        # the stream key turned into a string: every read fails with WRONGTYPE, nothing to wait out
        await client.delete(KEY)
        await client.set(KEY, "not a stream")

        async def healthz_fails():
            return (await probes(runtime))[0] == 503
        await until(healthz_fails)
        assert (await probes(runtime))[1] == 503
    finally:
        await runtime.stop()
        await client.aclose()


async def test_lag_and_pending_of_a_stuck_consumer_are_on_metrics(redis_url):
    """A consumer stuck on its first batch: what it has not been handed (lag) and what it holds
    unacknowledged (pending) are exported for the alert rules, while it is stuck."""
    seen: list[int] = []
    gate = asyncio.Event()
    runtime = service(redis_url, seen, gate)
    runtime.bus.monitor_interval_s = 0.1  # sample often (15 s in a service)
    client = aioredis.Redis.from_url(redis_url)
    for i in range(30):
        await client.xadd(KEY, {DATA_FIELD: kline(i).to_json()})
    await runtime.start()
    try:
        async def sampled():
            got = await scrape(runtime)
            return got.get("klinebus_bus_group_pending_entries", 0) >= BATCH and \
                got.get("klinebus_bus_group_lag_entries", 0) >= 30 - 2 * BATCH  # a batch may be read ahead
        await until(sampled)
        got = await scrape(runtime)
        assert got["klinebus_bus_group_lag_entries"] + got["klinebus_bus_group_pending_entries"] == 30
        assert got["klinebus_bus_group_oldest_pending_seconds"] >= 0
        gate.set()

        async def drained():
            got = await scrape(runtime)
            return len(seen) == 30 and got.get("klinebus_bus_group_lag_entries") == 0 \
                and got.get("klinebus_bus_group_pending_entries") == 0
        await until(drained)
    finally:
        gate.set()
        await runtime.stop()
        await client.aclose()
