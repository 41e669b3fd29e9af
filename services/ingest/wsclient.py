"""Binance combined-stream connections: split, keep alive, rotate, reconnect.

* Streams are split into connections of at most ``streams_per_connection``
  (Binance: ``rules.MAX_STREAMS_PER_CONNECTION``). The first ``URL_STREAMS_MAX`` go in the
  ``/stream?streams=`` URL; the rest are added with batched ``SUBSCRIBE`` requests paced
  well under the 5 incoming messages per second rule.
* Server pings are answered by the websocket library with a pong carrying the same
  payload; we send no pings of our own (they would count against the 5 messages/s).
* Before the 24 h cut (``rotate_after_s``) and on ``serverShutdown`` a replacement
  connection is opened first; the old one is closed only after the new one delivered a
  message, so there is no window without a connection.
* A connection that drops or stays silent for ``silence_timeout_s`` is replaced after an
  exponential backoff with jitter, within the connection-attempt budget.
* ``on_connected(streams, reason)`` runs for every (re)connection, so the caller can
  backfill what the previous connection missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Awaitable, Callable, Sequence
from urllib.parse import urlparse

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from services.ingest import rules
from services.ingest.backoff import Backoff, ConnectionBudget, Pacer

log = logging.getLogger("klinebus.ingest.ws")

# Long URLs are refused by some proxies; streams beyond this many are SUBSCRIBEd instead.
URL_STREAMS_MAX = 100
# One SUBSCRIBE request carries at most this many streams.
SUBSCRIBE_BATCH = 200
MAX_MESSAGE_BYTES = 1 << 20
CLOSE_TIMEOUT_S = 2.0

OnMessage = Callable[[bytes | str], Awaitable[None]]
OnConnected = Callable[[Sequence[str], str], None]


def is_server_shutdown(text: bytes | str) -> bool:
    """``serverShutdown`` arrives raw (``{"e":...}``), combined (``{"data":{"e":...}}``) or, on the
    websocket API, as ``{"event":{"e":...}}``."""
    if rules.SERVER_SHUTDOWN_EVENT.encode() not in (text if isinstance(text, bytes) else text.encode()):
        return False
    try:
        msg = orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(msg, dict):
        return False
    for body in (msg, msg.get("data"), msg.get("event")):
        if isinstance(body, dict) and body.get("e") == rules.SERVER_SHUTDOWN_EVENT:
            return True
    return False


def split_streams(streams: Sequence[str], per_connection: int) -> list[list[str]]:
    if not 0 < per_connection <= rules.MAX_STREAMS_PER_CONNECTION:
        raise ValueError(f"streams per connection must be in 1..{rules.MAX_STREAMS_PER_CONNECTION}, got {per_connection}")
    return [list(streams[i : i + per_connection]) for i in range(0, len(streams), per_connection)]


class _Connection:
    """One websocket and its reader; tells its slot when it ended, went silent or must rotate."""

    def __init__(self, ws: ClientConnection, on_message: OnMessage, slot: int) -> None:
        self.ws = ws
        self.slot = slot
        self.name = f"slot{slot}"
        self.opened = time.monotonic()
        self.last_message = self.opened
        self.delivered = asyncio.Event()
        self.shutdown = False
        self.ended = asyncio.Event()
        self._on_message = on_message
        self.reader = asyncio.create_task(self._read(), name=f"ingest-ws:{self.name}")

    async def _read(self) -> None:
        try:
            async for text in self.ws:
                self.last_message = time.monotonic()
                if is_server_shutdown(text):
                    log.info("%s: serverShutdown received", self.name)
                    self.shutdown = True
                    continue
                await self._on_message(text)
                self.delivered.set()
        except ConnectionClosed as exc:
            log.info("%s: connection closed (%s)", self.name, exc)
        finally:
            self.ended.set()

    async def close(self) -> None:
        self.reader.cancel()
        # asyncio.wait, not ``await self.reader``: a cancellation of the caller (a stopping
        # slot) must still propagate instead of being swallowed with the reader's own.
        await asyncio.wait({self.reader})
        if not self.reader.cancelled() and self.reader.exception() is not None:
            log.error("%s: reader failed", self.name, exc_info=self.reader.exception())
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), CLOSE_TIMEOUT_S)


class BinanceStreamClient:
    def __init__(
        self,
        base_url: str,
        streams: Sequence[str],
        on_message: OnMessage,
        on_connected: OnConnected,
        *,
        streams_per_connection: int = 200,
        rotate_after_s: float = rules.CONNECTION_LIFETIME_S - 3600,
        silence_timeout_s: float = 30.0,
        reconnect_initial_s: float = 1.0,
        reconnect_max_s: float = 60.0,
        budget: ConnectionBudget | None = None,
        metrics: Any = None,
        url_streams_max: int = URL_STREAMS_MAX,
    ) -> None:
        if rotate_after_s >= rules.CONNECTION_LIFETIME_S:
            raise ValueError(f"rotate_after_s must be below Binance's {rules.CONNECTION_LIFETIME_S:.0f} s lifetime")
        if not streams:
            raise ValueError("no streams to subscribe to")
        self.base_url = base_url.rstrip("/")
        self.chunks = split_streams(list(streams), streams_per_connection)
        self.on_message = on_message
        self.on_connected = on_connected
        self.rotate_after_s = rotate_after_s
        self.silence_timeout_s = silence_timeout_s
        self.reconnect_initial_s = reconnect_initial_s
        self.reconnect_max_s = reconnect_max_s
        self.budget = budget or ConnectionBudget()
        self.metrics = metrics
        self.url_streams_max = url_streams_max
        self.open_connections = 0
        self._connections: dict[int, set[_Connection]] = {}  # open connections per slot
        host = urlparse(self.base_url).hostname or ""
        # Environment proxies never apply to loopback (the simulator).
        self._proxy: Any = None if host in ("127.0.0.1", "localhost", "::1") else True

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for i, chunk in enumerate(self.chunks):
                tg.create_task(self._slot(i, chunk), name=f"ingest-ws-slot:{i}")

    def _count(self, what: str, label: str) -> None:
        if self.metrics is not None:
            getattr(self.metrics, what).labels(label).inc()

    def _set_open(self, delta: int) -> None:
        self.open_connections += delta
        if self.metrics is not None:
            self.metrics.ws_connections.set(self.open_connections)

    async def _slot(self, index: int, streams: list[str]) -> None:
        """Keeps one chunk of streams connected until cancelled; then closes its connections."""
        backoff = Backoff(self.reconnect_initial_s, self.reconnect_max_s)
        try:
            current = await self._open(index, streams, backoff, "start")
            while True:
                cause = await self._watch(current)
                self._count("ws_disconnects", cause)
                if current.delivered.is_set():
                    backoff.reset()
                if cause in ("rotation", "shutdown"):
                    log.info("slot %d: %s: opening the replacement before closing the old connection", index, cause)
                    new = await self._open(index, streams, backoff, cause)
                    # keep the old one until the new one delivers (or the old one dies anyway)
                    delivered = asyncio.ensure_future(new.delivered.wait())
                    try:
                        await asyncio.wait(
                            {delivered, current.reader}, timeout=self.silence_timeout_s, return_when=asyncio.FIRST_COMPLETED
                        )
                    finally:
                        delivered.cancel()
                    await self._close(current)
                    current = new
                else:
                    log.warning("slot %d: connection %s; reconnecting", index, cause)
                    await self._close(current)
                    if not current.delivered.is_set():
                        # a server that accepts and drops at once must not get a connection storm
                        await asyncio.sleep(backoff.next_delay())
                    current = await self._open(index, streams, backoff, "reconnect")
        finally:
            # stop() cancels the slot: close what it holds (``new`` too, mid-rotation), or the
            # sockets and their reader tasks would outlive the service.
            for conn in list(self._connections.get(index, ())):
                await self._close(conn)

    async def _watch(self, conn: _Connection) -> str:
        step = min(0.25, self.silence_timeout_s / 4)
        while True:
            # The reader task ends exactly when the connection does; waiting on it (one task for
            # the connection's whole life) allocates nothing that outlives the call, unlike a
            # fresh ``shield(ended.wait())`` per step, which leaked a task each timeout.
            await asyncio.wait({conn.reader}, timeout=step)
            now = time.monotonic()
            if conn.ended.is_set():
                return "closed"
            if conn.shutdown:
                return "shutdown"
            if now - conn.last_message > self.silence_timeout_s:
                return "silent"
            if now - conn.opened > self.rotate_after_s:
                return "rotation"

    async def _close(self, conn: _Connection) -> None:
        held = self._connections.get(conn.slot, set())
        if conn not in held:
            return  # already closed
        held.discard(conn)
        self._set_open(-1)
        await conn.close()

    async def _open(self, index: int, streams: list[str], backoff: Backoff, reason: str) -> _Connection:
        in_url, later = streams[: self.url_streams_max], streams[self.url_streams_max :]
        url = f"{self.base_url}/stream?streams={'/'.join(in_url)}"
        while True:
            await self.budget.acquire()
            try:
                ws = await connect(
                    url,
                    ping_interval=None,  # the server pings; our own pings would count against 5 msg/s
                    max_size=MAX_MESSAGE_BYTES,
                    open_timeout=10,
                    close_timeout=CLOSE_TIMEOUT_S,
                    proxy=self._proxy,
                )
            except (OSError, InvalidHandshake, InvalidURI, asyncio.TimeoutError) as exc:
                delay = backoff.next_delay()
                self._count("ws_connects", "failed")
                log.warning("slot %d: connect failed (%s); retrying in %.2f s", index, exc, delay)
                await asyncio.sleep(delay)
                continue
            conn = _Connection(ws, self.on_message, index)
            # registered before anything else can be cancelled, so the slot's cleanup closes it
            self._connections.setdefault(index, set()).add(conn)
            self._set_open(+1)
            self._count("ws_connects", reason)
            if later:
                await self._subscribe(ws, later)
            log.info("slot %d: connected (%s, %d streams)", index, reason, len(streams))
            self.on_connected(streams, reason)
            return conn

    async def _subscribe(self, ws: ClientConnection, streams: list[str]) -> None:
        pacer = Pacer()
        for n, i in enumerate(range(0, len(streams), SUBSCRIBE_BATCH), start=1):
            await pacer.wait()
            batch = streams[i : i + SUBSCRIBE_BATCH]
            await ws.send(orjson.dumps({"method": "SUBSCRIBE", "params": batch, "id": n}).decode())
