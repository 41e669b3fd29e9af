"""The simulator's websocket side, as Binance's market-data streams behave.

Raw ``/ws/<stream>``, combined ``/stream?streams=a/b`` and bare ``/ws``; SUBSCRIBE /
UNSUBSCRIBE / LIST_SUBSCRIPTIONS / GET_PROPERTY / SET_PROPERTY answered as Binance answers
them, errors included (``rules.WS_ERROR_*``); server pings whose pongs must carry the same
payload; the 5-messages-per-second incoming limit; the 24 h connection lifetime (shortened
by the fault plan); ``serverShutdown``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from typing import Any, Callable

import orjson
from aiohttp import WSMsgType, web

from libs.common.klines import kline_to_ws_payload
from services.ingest import rules
from services.ingest.simulator.faults import FaultPlan
from services.ingest.simulator.stats import SimulatorStats
from services.ingest.simulator.tape import TapeEvent

log = logging.getLogger("klinebus.simulator")


class Connection:
    """One client's websocket: what it subscribed to and its ping / rate bookkeeping."""

    def __init__(self, ws: web.WebSocketResponse, request: web.Request, streams: set[str], combined: bool) -> None:
        self.ws = ws
        self.request = request
        self.streams = streams
        self.combined = combined
        self.opened = time.monotonic()
        # one writer at a time: the replay, housekeeping and control answers share the socket
        self.lock = asyncio.Lock()
        self.incoming: deque[float] = deque()
        self.pending_ping: bytes | None = None
        self.ping_sent_at = 0.0

    async def send(self, text: str) -> bool:
        if self.ws.closed:
            return False
        async with self.lock:
            try:
                await self.ws.send_str(text)
            except (ConnectionError, RuntimeError):
                return False
        return True

    def abort(self) -> None:
        """Cut the TCP connection with no close frame, as a network drop does."""
        transport = self.request.transport
        if transport is not None:
            transport.abort()


class WebsocketFront:
    """Every open connection, the replay's broadcast to them and the connection-level faults."""

    def __init__(self, faults: FaultPlan, stats: SimulatorStats, now_ms: Callable[[], int]) -> None:
        self.faults = faults
        self.stats = stats
        self.now_ms = now_ms
        self.conns: set[Connection] = set()
        self._closers: list[asyncio.Task[Any]] = []

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/stream", self.handle)
        app.router.add_get("/ws", self.handle)
        app.router.add_get("/ws/{streams:.*}", self.handle)

    def subscribed_streams(self) -> set[str]:
        """The streams at least one open connection listens to."""
        return set().union(*(c.streams for c in list(self.conns)))

    async def close(self) -> None:
        for task in self._closers:
            task.cancel()
        for task in self._closers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._closers.clear()
        for conn in list(self.conns):
            with contextlib.suppress(Exception):
                await conn.ws.close()

    # --- what the replay sends ------------------------------------------------------------

    async def broadcast(self, event: TapeEvent) -> None:
        raw = kline_to_ws_payload(event.kline, event_time=event.time)
        combined_text: str | None = None
        raw_text: str | None = None
        for c in list(self.conns):
            if event.stream not in c.streams:
                continue
            if c.combined:
                combined_text = combined_text or orjson.dumps({"stream": event.stream, "data": raw}).decode()
                text = combined_text
            else:
                raw_text = raw_text or orjson.dumps(raw).decode()
                text = raw_text
            if await c.send(text):
                self.stats.messages_sent += 1

    async def fire(self, name: str) -> None:
        """A connection-level fault of the plan: ``drop``, ``shutdown`` or ``malformed``."""
        conns = list(self.conns)
        if name == "drop":
            log.info("fault: dropping %d connections", len(conns))
            for c in conns:
                self.stats.connections_closed_by_server += 1
                c.abort()
        elif name == "shutdown":
            log.info("fault: serverShutdown to %d connections", len(conns))
            text = orjson.dumps({"e": rules.SERVER_SHUTDOWN_EVENT, "E": self.now_ms()}).decode()
            for c in conns:
                await c.send(text)
            self._closers.append(asyncio.create_task(self._close_later(conns, self.faults.shutdown_grace_s)))
        elif name == "malformed":
            for c in conns:
                await c.send('{"stream":"btcusdt@kline_1m","data":{"e":"kline","k":{"t":')

    async def _close_later(self, conns: list[Connection], delay: float) -> None:
        await asyncio.sleep(delay)
        for c in conns:
            if not c.ws.closed:
                self.stats.connections_closed_by_server += 1
                await c.ws.close()

    async def housekeeping(self) -> None:
        """Server pings, pong deadlines and the connection lifetime."""
        f = self.faults
        step = min(f.ping_interval_s, 0.1)
        while True:
            await asyncio.sleep(step)
            now = time.monotonic()
            for c in list(self.conns):
                if c.ws.closed:
                    continue
                if f.max_connection_age_s is not None and now - c.opened >= f.max_connection_age_s:
                    self.stats.connections_closed_by_server += 1
                    await c.ws.close()
                    continue
                if c.pending_ping is not None and now - c.ping_sent_at > f.pong_timeout_s:
                    self.stats.connections_closed_by_server += 1
                    await c.ws.close()
                    continue
                if c.pending_ping is None and now - max(c.ping_sent_at, c.opened) >= f.ping_interval_s:
                    c.pending_ping = os.urandom(8).hex().encode()
                    c.ping_sent_at = now
                    with contextlib.suppress(ConnectionError, RuntimeError):
                        await c.ws.ping(c.pending_ping)
                        self.stats.pings_sent += 1

    # --- a client's connection ------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/stream":
            names = request.query.get("streams", "")
            combined = True
        else:
            names = request.match_info.get("streams", "")
            combined = False
        streams = {s for s in names.split("/") if s}
        if len(streams) > rules.MAX_STREAMS_PER_CONNECTION:
            return web.json_response({"code": -1, "msg": "too many streams"}, status=400)
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        conn = Connection(ws, request, streams, combined)
        self.conns.add(conn)
        self.stats.connections_opened += 1
        self.stats.connections_per_path[request.path.split("/")[1]] = (
            self.stats.connections_per_path.get(request.path.split("/")[1], 0) + 1
        )
        try:
            async for msg in ws:
                if self._over_rate(conn):
                    self.stats.rate_limit_disconnects += 1
                    await ws.close()
                    break
                if msg.type == WSMsgType.TEXT:
                    await self._control(conn, msg.data)
                elif msg.type == WSMsgType.PING:
                    await ws.pong(msg.data)
                elif msg.type == WSMsgType.PONG:
                    if conn.pending_ping is not None and msg.data == conn.pending_ping:
                        self.stats.pongs_ok += 1
                        conn.pending_ping = None
                    elif conn.pending_ping is not None:
                        self.stats.pongs_bad += 1
                elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.ERROR):
                    break
        finally:
            self.conns.discard(conn)
        return ws

    def _over_rate(self, conn: Connection) -> bool:
        now = time.monotonic()
        conn.incoming.append(now)
        while conn.incoming and now - conn.incoming[0] > 1.0:
            conn.incoming.popleft()
        return len(conn.incoming) > rules.MAX_INCOMING_MESSAGES_PER_SECOND

    async def _control(self, conn: Connection, text: str) -> None:
        """Binance's answers to control requests, errors included (see ``rules.WS_ERROR_*``)."""
        try:
            req = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            await self._error(conn, rules.WS_ERROR_INVALID_JSON, f"Invalid JSON: {exc}", None)
            return
        if not isinstance(req, dict):
            await self._error(conn, rules.WS_ERROR_INVALID_REQUEST, "Invalid request: expected an object", None)
            return
        rid = req.get("id")
        if not (isinstance(rid, int) and not isinstance(rid, bool) and rid >= 0):
            await self._error(conn, rules.WS_ERROR_INVALID_REQUEST, "Invalid request: request ID must be an unsigned integer", None)
            return
        method = req.get("method")
        if method is None:
            await self._error(conn, rules.WS_ERROR_INVALID_REQUEST, "Invalid request: missing field `method`", rid)
            return
        if method not in rules.WS_METHODS:
            expected = ", ".join(f"`{m}`" for m in rules.WS_METHODS)
            await self._error(conn, rules.WS_ERROR_INVALID_REQUEST,
                              f"Invalid request: unknown variant `{method}`, expected one of {expected}", rid)
            return
        params = req.get("params") or []
        if method in ("SUBSCRIBE", "UNSUBSCRIBE") and not (
            isinstance(params, list) and all(isinstance(p, str) for p in params)
        ):
            await self._error(conn, rules.WS_ERROR_INVALID_REQUEST, "Invalid request: invalid type: expected a sequence of strings", rid)
            return
        if method == "SUBSCRIBE":
            self.stats.subscribe_requests += 1
            if len(conn.streams | set(params)) > rules.MAX_STREAMS_PER_CONNECTION:
                await self._error(conn, rules.WS_ERROR_TOO_MANY_SUBSCRIPTIONS, "Too many subscriptions", rid)
                self.stats.connections_closed_by_server += 1
                await conn.ws.close(code=rules.WS_CLOSE_POLICY_VIOLATION, message=b"Invalid request")
                return
            conn.streams |= set(params)
            result: Any = None
        elif method == "UNSUBSCRIBE":
            conn.streams -= set(params)
            result = None
        elif method == "LIST_SUBSCRIPTIONS":
            result = sorted(conn.streams)
        elif method == "GET_PROPERTY":
            if params != ["combined"]:
                await self._error(conn, rules.WS_ERROR_UNKNOWN_PROPERTY, "Unknown property", rid)
                return
            result = conn.combined
        else:  # SET_PROPERTY
            if len(params) != 2 or params[0] != "combined":
                await self._error(conn, rules.WS_ERROR_UNKNOWN_PROPERTY, "Unknown property", rid)
                return
            if not isinstance(params[1], bool):
                await self._error(conn, rules.WS_ERROR_INVALID_VALUE, "Invalid value type: expected Boolean", rid)
                return
            conn.combined = params[1]
            result = None
        await conn.send(orjson.dumps({"result": result, "id": rid}).decode())

    async def _error(self, conn: Connection, code: int, msg: str, rid: int | None) -> None:
        self.stats.error_replies += 1
        await conn.send(orjson.dumps({"error": {"code": code, "msg": msg}, "id": rid}).decode())
