"""Helpers for the ingest tests: shipped real candles, a started ingest runtime, klines.v1 reads."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path


from libs.common import topics
from libs.common.klines import Kline
from services.ingest.settings import IngestSettings
from services.ingest.simulator import load_candles
from tests.streams import open_times_by_stream, read_topic, replaying, wait_for_events

SHIPPED = Path(__file__).resolve().parents[3] / "data" / "klines"


def shipped_candles(n: int, symbols=("BTCUSDT", "ETHUSDT", "SOLUSDT"), skip: int = 0) -> dict[tuple[str, str], list[Kline]]:
    paths = [p for p in sorted(SHIPPED.glob("*-1m-*.csv.gz")) if p.name.split("-")[0] in symbols]
    assert paths, f"no shipped candles under {SHIPPED}"
    return load_candles(paths, limit=n, skip=skip)


def ingest_settings(sim, tmp_path, **over) -> IngestSettings:
    symbols = sorted({s for s, _ in sim.candles})
    intervals = sorted({i for _, i in sim.candles})
    base = dict(
        binance_ws_url=sim.ws_url,
        binance_rest_url=sim.rest_url,
        symbols=symbols,
        intervals=intervals,
        data_dir=tmp_path,
        http_port=0,
        http_host="127.0.0.1",
        consumer_name="test",
        silence_timeout_s=2.0,
        reconnect_initial_s=0.05,
        reconnect_max_s=0.5,
    )
    base.update(over)
    return IngestSettings(**base)


async def read_klines(url: str, topic: str = topics.KLINES) -> list[dict]:
    return await read_topic(url, topic)


async def wait_for_count(url: str, expected: int, timeout: float = 30.0, topic: str = topics.KLINES) -> list[dict]:
    return await wait_for_events(url, topic, expected, timeout, strict=False)


async def wait_for_open_time(url: str, open_time: int, timeout: float = 30.0) -> list[dict]:
    """klines.v1 once a candle with ``open_time`` is on it (the last one of a replay)."""
    deadline = time.monotonic() + timeout
    got: list[dict] = []
    while time.monotonic() < deadline:
        got = await read_klines(url)
        if any(e["open_time"] == open_time for e in got):
            await asyncio.sleep(0.3)  # anything extra (a duplicate) would show up now
            return await read_klines(url)
        await asyncio.sleep(0.1)
    return got


@contextlib.asynccontextmanager
async def running(runtime):
    await runtime.start(http=False)
    try:
        yield runtime
    finally:
        await runtime.stop()


simulator = replaying  # a simulator whose replay starts only once a client is connected


async def begin_when_connected(sim, clients: int = 1, timeout: float = 10.0) -> None:
    await sim.begin_when_connected(clients, timeout)


keys_by_stream = open_times_by_stream


def expected_by_stream(candles: dict[tuple[str, str], list[Kline]]) -> dict[tuple[str, str], list[int]]:
    return {key: [k.open_time for k in ks] for key, ks in candles.items()}


