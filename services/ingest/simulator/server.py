"""A Binance-speaking exchange on loopback that replays real candles at an accelerated clock.

The simulated clock, the lifecycle and the replay of the tape (``tape.py``) with the fault
plan (``faults.py``) live here; the websocket side is ``websocket.py``, the REST side
``rest.py``. Each side answers as Binance answers, errors included.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import replace
from typing import Any, Mapping, Sequence

from aiohttp import web

from libs.common.klines import Kline, ws_stream_name
from services.ingest.simulator.faults import FaultPlan
from services.ingest.simulator.rest import RestFront
from services.ingest.simulator.stats import SimulatorStats
from services.ingest.simulator.tape import TapeEvent, build_tape, finest_interval_ms
from services.ingest.simulator.websocket import WebsocketFront

log = logging.getLogger("klinebus.simulator")


class ExchangeSimulator:
    def __init__(
        self,
        candles: Mapping[tuple[str, str], Sequence[Kline]],
        *,
        speed: float = 60.0,
        updates_per_candle: int = 2,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: FaultPlan | None = None,
        seed: int = 0,
    ) -> None:
        if not candles or not any(candles.values()):
            raise ValueError("the simulator needs at least one candle to replay")
        if speed <= 0:
            raise ValueError(f"speed must be > 0 simulated seconds per real second, got {speed}")
        self.candles = {key: sorted(ks, key=lambda k: k.open_time) for key, ks in candles.items()}
        self.speed = speed
        self.updates_per_candle = updates_per_candle
        self.host = host
        self.port = port
        self.faults = faults or FaultPlan()
        self.tape: list[TapeEvent] = build_tape(self.candles, updates_per_candle, seed)
        self.tick_ms = finest_interval_ms(self.candles)
        self.start_ms = min(ks[0].open_time for ks in self.candles.values())
        self.end_ms = self.tape[-1].time
        self.stats = SimulatorStats()
        self.ws_url = ""
        self.rest_url = ""
        self.websocket = WebsocketFront(self.faults, self.stats, self.now_ms)
        self.rest = RestFront(self.candles, self.tape, self.faults, self.stats, self.now_ms)
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._done = asyncio.Event()
        self._t0 = 0.0
        self.started_wall = 0.0

    # --- clock ----------------------------------------------------------------------------

    def now_ms(self) -> int:
        """The simulated exchange clock (ms); frozen at the start before ``start()``."""
        if not self._t0:
            return self.start_ms
        return self.start_ms + int((time.monotonic() - self._t0) * self.speed * 1000)

    def _tick_of(self, sim_ms: int) -> int:
        return (sim_ms - self.start_ms) // self.tick_ms

    def closed_candles(self) -> dict[tuple[str, str], list[Kline]]:
        return {key: list(ks) for key, ks in self.candles.items()}

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self, replay: bool = True) -> "ExchangeSimulator":
        """Serve; with ``replay=False`` the clock and replay wait for ``begin()`` (so a client can
        connect before the first candle closes)."""
        app = web.Application()
        self.websocket.routes(app)
        self.rest.routes(app)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.port = port
        self.ws_url = f"ws://{self.host}:{port}"
        self.rest_url = f"http://{self.host}:{port}"
        self._tasks.append(asyncio.create_task(self.websocket.housekeeping(), name="simulator:housekeeping"))
        log.info("exchange simulator on %s (%d messages, speed x%g)", self.ws_url, len(self.tape), self.speed)
        if replay:
            self.begin()
        return self

    def begin(self) -> None:
        """Start the simulated clock and the replay."""
        if self._t0:
            return
        self._t0 = time.monotonic()
        self.started_wall = time.time()  # wall clock of simulated start_ms (benchmarks map closes to it)
        self._tasks.append(asyncio.create_task(self._replay(), name="simulator:replay"))

    async def begin_when_connected(self, clients: int = 1, timeout: float = 30.0) -> None:
        """Start the replay once ``clients`` connections are open, so none misses the first candle."""
        deadline = time.monotonic() + timeout
        while self.connections < clients:
            if time.monotonic() > deadline:
                raise TimeoutError(f"simulator: {self.connections} of {clients} clients connected after {timeout:.0f}s")
            await asyncio.sleep(0.02)
        self.begin()

    @property
    def connections(self) -> int:
        return len(self.websocket.conns)

    async def wait_done(self) -> None:
        await self._done.wait()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        await self.websocket.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> "ExchangeSimulator":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- replay ---------------------------------------------------------------------------

    async def _replay(self) -> None:
        f = self.faults
        held: list[TapeEvent] = []  # closes held back for out-of-order delivery
        recent_closed: deque[TapeEvent] = deque(maxlen=max(f.late_by, 1) * max(len(self.candles), 1) + 1)
        fired: set[tuple[str, int]] = set()
        closed_count = 0
        last_tick = -1
        for event in self.tape:
            delay = (event.time - self.start_ms) / (self.speed * 1000) - (time.monotonic() - self._t0)
            if delay > 0:
                await asyncio.sleep(delay)
            tick = self._tick_of(event.time)
            if tick != last_tick:
                if held:
                    for h in held:
                        await self.websocket.broadcast(h)
                    held.clear()
                await self._tick_faults(tick, fired, recent_closed)
                last_tick = tick
            if any(a <= tick < b for a, b in f.silence) and (
                f.silence_streams is None or event.stream in f.silence_streams
            ):
                continue
            if event.closed:
                closed_count += 1
                if tick in f.impossible_at:
                    bad = replace(event.kline, high=event.kline.low * 0.5)
                    await self.websocket.broadcast(TapeEvent(event.time, event.stream, bad))
                if tick in f.out_of_order_at:
                    held.append(event)
                    continue
                recent_closed.append(event)
            await self.websocket.broadcast(event)
            if event.closed and f.duplicate_every and closed_count % f.duplicate_every == 0:
                await self.websocket.broadcast(event)
        for h in held:
            await self.websocket.broadcast(h)
        self._done.set()
        log.info("replay done (%d messages)", len(self.tape))

    async def _tick_faults(self, tick: int, fired: set[tuple[str, int]], recent: deque[TapeEvent]) -> None:
        f = self.faults
        for name, ticks in (("drop", f.drop_at), ("shutdown", f.shutdown_at), ("malformed", f.malformed_at)):
            # a tick may be skipped by the tape (no message in it): fire at the first tick at or after it
            for t in ticks:
                if t <= tick and (name, t) not in fired:
                    fired.add((name, t))
                    await self.websocket.fire(name)
        if f.late_every and tick and tick % f.late_every == 0 and recent:
            late = recent[0]
            await self.websocket.broadcast(late)


def stream_names(candles: Mapping[tuple[str, str], Sequence[Kline]]) -> list[str]:
    return [ws_stream_name(s, i) for s, i in candles]
