"""The runtime every service shares: bus, health, metrics, background tasks, clean stop.

A service's ``app.py`` builds a ``ServiceRuntime`` in ``create(settings, url)``
without touching the network, registers its handlers on ``runtime.bus`` and its
long-running coroutines with ``runtime.background``; ``klinebus run <service>``
(or the demo, or a test) then starts it. Building without connecting is what
lets the AsyncAPI document be generated from the real apps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any, Awaitable, Callable

from faststream import FastStream
from faststream.specification import AsyncAPI

from libs.common.bus import Bus
from libs.common.settings import ServiceSettings
from libs.common.telemetry import Health, ServiceMetrics, start_http

log = logging.getLogger("klinebus.service")

Hook = Callable[[], Awaitable[Any]]


class ServiceFailed(RuntimeError):
    """The service stopped because a part of it died; the process exits non-zero."""


class ServiceRuntime:
    def __init__(self, name: str, settings: ServiceSettings, url: str, description: str = "") -> None:
        self.name = name
        self.settings = settings
        self.url = url
        self.metrics = ServiceMetrics(name)
        self.bus = Bus.from_settings(name, settings, url, self.metrics)
        self.health = Health()
        self.description = description
        self.app = FastStream(
            self.bus.broker,
            specification=AsyncAPI(self.bus.broker, title=f"klinebus {name}", description=description or None),
            logger=logging.getLogger(f"klinebus.{name}"),
        )
        self._startup: list[Hook] = []
        self._shutdown: list[Hook] = []
        self._background: list[Hook] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self._http = None
        self.http_port: int | None = None
        self._stop_event: asyncio.Event | None = None
        self.health.set("broker", False)
        # A consumer that died (or a group that could not be recreated) fails /healthz, and under
        # `klinebus run` ends the process non-zero so the orchestrator restarts it.
        self.bus.on_fatal = self._bus_failed
        self.health.set_live("bus", lambda: self.bus.fatal is None)
        self.health.set("bus", self.bus.ready)

    # --- registration ------------------------------------------------------------------

    def on_startup(self, fn: Hook) -> Hook:
        """Runs before consuming starts (warm-up, loading state)."""
        self._startup.append(fn)
        return fn

    def on_shutdown(self, fn: Hook) -> Hook:
        """Runs after consuming stopped (checkpoints, closing clients)."""
        self._shutdown.append(fn)
        return fn

    def background(self, fn: Hook) -> Hook:
        """A long-running coroutine (a websocket client, a scheduler) started with the service."""
        self._background.append(fn)
        return fn

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self, http: bool = True) -> None:
        if http:
            self._http, self.http_port = await start_http(
                self.health, self.settings.http_host, self.settings.http_port
            )
            log.info("%s telemetry on :%d (/metrics /healthz /readyz)", self.name, self.http_port)
        for hook in self._startup:
            await hook()
        await self.bus.start()
        self.health.set("broker", True)
        for fn in self._background:
            self._tasks.append(asyncio.create_task(self._supervise(fn), name=f"{self.name}:{fn.__name__}"))
        log.info("%s started (consumer %s)", self.name, self.bus.consumer)

    def _bus_failed(self, reason: str) -> None:
        self.health.fail(reason)
        if self._stop_event is not None:
            self._stop_event.set()

    async def _supervise(self, fn: Hook) -> None:
        try:
            await fn()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("%s: background task %s failed; service marked unhealthy", self.name, fn.__name__)
            self.health.set(f"task:{fn.__name__}", False)
            self.health.fail(f"background task {fn.__name__} failed: {type(exc).__name__}: {exc}")
            if self._stop_event is not None:
                self._stop_event.set()  # under `klinebus run`: exit non-zero so the pod restarts
            raise

    async def stop(self) -> None:
        self.health.set("broker", False)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        await self.bus.stop()
        for hook in self._shutdown:
            try:
                await hook()
            except Exception:  # noqa: BLE001 - one failing hook must not skip the others
                log.exception("%s: shutdown hook %s failed", self.name, hook.__name__)
        if self._http is not None:
            await self._http.cleanup()
            self._http = None
        log.info("%s stopped", self.name)

    async def run_forever(self, stop: asyncio.Event | None = None, on_started: Callable[[], None] | None = None) -> None:
        """Start, then run until SIGTERM/SIGINT (or ``stop`` is set), then stop cleanly.
        ``on_started`` runs once the service has started (``launch`` settles the heap there)."""
        stop = stop or asyncio.Event()
        self._stop_event = stop
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        await self.start()
        if on_started is not None:
            on_started()
        try:
            await stop.wait()
        finally:
            await self.stop()
        if self.health.fatal:
            raise ServiceFailed(f"{self.name}: {self.health.fatal}")
