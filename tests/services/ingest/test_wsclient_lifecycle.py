"""The websocket client frees what it allocates: no task per watch step, nothing open after stop."""

from __future__ import annotations

import asyncio
import contextlib
import time

from ingest_support import (
    begin_when_connected,
    ingest_settings,
    running,
    shipped_candles,
    simulator,
)

from services.ingest.app import create
from services.ingest.wsclient import BinanceStreamClient


class _BusyConnection:
    """A connection that keeps receiving messages and never ends; counts the watch's checks."""

    def __init__(self) -> None:
        self.ended = asyncio.Event()
        self.shutdown = False
        self.opened = time.monotonic()
        self.reader = asyncio.create_task(self.ended.wait(), name="fake-reader")
        self.checks = 0

    @property
    def last_message(self) -> float:
        self.checks += 1
        return time.monotonic()


def _ingest_tasks() -> list[str]:
    return sorted(
        t.get_name() for t in asyncio.all_tasks() if not t.done() and t.get_name().startswith(("ingest", "fake"))
    )


async def test_watching_a_long_connection_does_not_accumulate_tasks():
    client = BinanceStreamClient(
        "ws://127.0.0.1:1", ["btcusdt@kline_1m"], _noop_message, _noop_connected, silence_timeout_s=0.02
    )
    conn = _BusyConnection()
    before = len(asyncio.all_tasks())
    watch = asyncio.create_task(client._watch(conn))  # type: ignore[arg-type]
    while conn.checks < 200:  # 200 watch steps, each one a timeout
        await asyncio.sleep(0.05)
        assert len(asyncio.all_tasks()) <= before + 1, "the watch leaks a task per step"
    conn.ended.set()
    assert await watch == "closed"


async def test_stop_closes_every_connection_and_ends_every_ingest_task(redis_url, tmp_path):
    candles = shipped_candles(40, symbols=("BTCUSDT",))
    async with simulator(candles, speed=600) as sim:
        runtime = create(ingest_settings(sim, tmp_path), redis_url)
        async with running(runtime):
            await begin_when_connected(sim)
            assert runtime.ws_client.open_connections == 1
            await asyncio.sleep(0.3)
        assert runtime.ws_client.open_connections == 0
        assert _ingest_tasks() == []
        await _until(lambda: sim.connections == 0)


async def test_cancelling_mid_rotation_closes_both_connections():
    candles = shipped_candles(5, symbols=("BTCUSDT",))
    async with simulator(candles) as sim:  # replay never begins: the replacement never delivers
        client = BinanceStreamClient(
            sim.ws_url, ["btcusdt@kline_1m"], _noop_message, _noop_connected,
            rotate_after_s=0.2, silence_timeout_s=30.0,
        )  # fmt: skip
        run = asyncio.create_task(client.run())
        await _until(lambda: client.open_connections == 2)  # old + replacement, waiting for a message
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run
        assert client.open_connections == 0
        assert _ingest_tasks() == []
        await _until(lambda: sim.connections == 0)


async def _until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def _noop_message(text: bytes | str) -> None:
    pass


def _noop_connected(streams, reason: str) -> None:
    pass
