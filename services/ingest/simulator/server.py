"""A Binance-speaking exchange on loopback that replays real candles at an accelerated clock.

Websocket: raw ``/ws/<stream>``, combined ``/stream?streams=a/b``, bare ``/ws``;
SUBSCRIBE / UNSUBSCRIBE / LIST_SUBSCRIPTIONS requests; server pings whose pongs must carry
the same payload; ``serverShutdown``; the 5-messages-per-second incoming limit.
Control requests are answered as Binance answers them, errors included (``rules.WS_ERROR_*``).
REST: ``GET /api/v3/klines`` (the candles opened by the simulated clock, the one still in
progress included with its values so far, as Binance does), ``/api/v3/ping``, ``/api/v3/time``, with request weights, 429 + ``Retry-After``, and a
418 for a client that does not back off. Faults come from a ``FaultPlan``.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import orjson
from aiohttp import WSMsgType, web

from libs.common.klines import INTERVAL_MS, Kline, kline_to_rest_row, kline_to_ws_payload, ws_stream_name
from services.ingest import rules
from services.ingest.simulator.faults import FaultPlan
from services.ingest.simulator.tape import TapeEvent, build_tape, finest_interval_ms

log = logging.getLogger("klinebus.simulator")


@dataclass
class SimulatorStats:
    connections_opened: int = 0
    connections_closed_by_server: int = 0
    pings_sent: int = 0
    pongs_ok: int = 0
    pongs_bad: int = 0
    subscribe_requests: int = 0
    rate_limit_disconnects: int = 0
    messages_sent: int = 0
    rest_requests: int = 0
    rest_429: int = 0
    rest_418: int = 0
    rest_500: int = 0
    error_replies: int = 0
    connections_per_path: dict[str, int] = field(default_factory=dict)


class _Conn:
    def __init__(self, ws: web.WebSocketResponse, request: web.Request, streams: set[str], combined: bool) -> None:
        self.ws = ws
        self.request = request
        self.streams = streams
        self.combined = combined
        self.opened = time.monotonic()
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
        transport = self.request.transport
        if transport is not None:
            transport.abort()


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
        self._open_times = {key: [k.open_time for k in ks] for key, ks in self.candles.items()}
        self.speed = speed
        self.updates_per_candle = updates_per_candle
        self.host = host
        self.port = port
        self.faults = faults or FaultPlan()
        self.tape: list[TapeEvent] = build_tape(self.candles, updates_per_candle, seed)
        # in-progress states per stream, by send time: what REST shows for a candle still open
        self._updates: dict[tuple[str, str], tuple[list[int], list[Kline]]] = {}
        for e in self.tape:
            if not e.closed:
                times, states = self._updates.setdefault((e.kline.symbol, e.kline.interval), ([], []))
                times.append(e.time)
                states.append(e.kline)
        self.tick_ms = finest_interval_ms(self.candles)
        self.start_ms = min(ks[0].open_time for ks in self.candles.values())
        self.end_ms = self.tape[-1].time
        self.stats = SimulatorStats()
        self.ws_url = ""
        self.rest_url = ""
        self._conns: set[_Conn] = set()
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._done = asyncio.Event()
        self._t0 = 0.0
        self.started_wall = 0.0
        self._weight_window = 0
        self._weight_used = 0
        self._banned_until = 0.0
        self._klines_requests = 0

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
        app.router.add_get("/stream", self._ws_handler)
        app.router.add_get("/ws", self._ws_handler)
        app.router.add_get("/ws/{streams:.*}", self._ws_handler)
        app.router.add_get("/api/v3/klines", self._klines)
        app.router.add_get("/api/v3/ping", self._ping)
        app.router.add_get("/api/v3/time", self._time)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.port = port
        self.ws_url = f"ws://{self.host}:{port}"
        self.rest_url = f"http://{self.host}:{port}"
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="simulator:housekeeping"))
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
        return len(self._conns)

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
        for conn in list(self._conns):
            with contextlib.suppress(Exception):
                await conn.ws.close()
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
                        await self._broadcast(h)
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
                    await self._broadcast(TapeEvent(event.time, event.stream, bad))
                if tick in f.out_of_order_at:
                    held.append(event)
                    continue
                recent_closed.append(event)
            await self._broadcast(event)
            if event.closed and f.duplicate_every and closed_count % f.duplicate_every == 0:
                await self._broadcast(event)
        for h in held:
            await self._broadcast(h)
        self._done.set()
        log.info("replay done (%d messages)", len(self.tape))

    async def _tick_faults(self, tick: int, fired: set[tuple[str, int]], recent: deque[TapeEvent]) -> None:
        f = self.faults
        for name, ticks in (("drop", f.drop_at), ("shutdown", f.shutdown_at), ("malformed", f.malformed_at)):
            # a tick may be skipped by the tape (no message in it): fire at the first tick at or after it
            for t in ticks:
                if t <= tick and (name, t) not in fired:
                    fired.add((name, t))
                    await self._fire(name)
        if f.late_every and tick and tick % f.late_every == 0 and recent:
            late = recent[0]
            await self._broadcast(late)

    async def _fire(self, name: str) -> None:
        conns = list(self._conns)
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
            self._tasks.append(asyncio.create_task(self._close_later(conns, self.faults.shutdown_grace_s)))
        elif name == "malformed":
            for c in conns:
                await c.send('{"stream":"btcusdt@kline_1m","data":{"e":"kline","k":{"t":')

    async def _close_later(self, conns: list[_Conn], delay: float) -> None:
        await asyncio.sleep(delay)
        for c in conns:
            if not c.ws.closed:
                self.stats.connections_closed_by_server += 1
                await c.ws.close()

    async def _broadcast(self, event: TapeEvent) -> None:
        raw = kline_to_ws_payload(event.kline, event_time=event.time)
        combined_text: str | None = None
        raw_text: str | None = None
        for c in list(self._conns):
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

    async def _housekeeping(self) -> None:
        """Server pings, pong deadlines and the connection lifetime."""
        f = self.faults
        step = min(f.ping_interval_s, 0.1)
        while True:
            await asyncio.sleep(step)
            now = time.monotonic()
            for c in list(self._conns):
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

    # --- websocket ------------------------------------------------------------------------

    async def _ws_handler(self, request: web.Request) -> web.StreamResponse:
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
        conn = _Conn(ws, request, streams, combined)
        self._conns.add(conn)
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
            self._conns.discard(conn)
        return ws

    def _over_rate(self, conn: _Conn) -> bool:
        now = time.monotonic()
        conn.incoming.append(now)
        while conn.incoming and now - conn.incoming[0] > 1.0:
            conn.incoming.popleft()
        return len(conn.incoming) > rules.MAX_INCOMING_MESSAGES_PER_SECOND

    async def _control(self, conn: _Conn, text: str) -> None:
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

    async def _error(self, conn: _Conn, code: int, msg: str, rid: int | None) -> None:
        self.stats.error_replies += 1
        await conn.send(orjson.dumps({"error": {"code": code, "msg": msg}, "id": rid}).decode())

    # --- REST -----------------------------------------------------------------------------

    def _spend_weight(self, weight: int) -> web.Response | None:
        """Binance's per-minute REQUEST_WEIGHT, in real time; None if the request may go on."""
        now = time.monotonic()
        if now < self._banned_until:
            # asked again inside a Retry-After: Binance bans the IP (418)
            self.stats.rest_418 += 1
            return web.json_response({"code": -1003, "msg": "Way too many requests; IP banned."}, status=418)
        window = int(now // 60)
        if window != self._weight_window:
            self._weight_window, self._weight_used = window, 0
        if self._weight_used + weight > self.faults.rest_weight_limit:
            retry = max(1, int(60 - now % 60))
            return self._too_many(retry)
        self._weight_used += weight
        return None

    def _too_many(self, retry_after: int) -> web.Response:
        self.stats.rest_429 += 1
        self._banned_until = time.monotonic() + retry_after
        return web.json_response(
            {"code": -1003, "msg": "Too many requests; please use the websocket for live updates."},
            status=rules.HTTP_TOO_MANY_REQUESTS,
            headers={rules.RETRY_AFTER_HEADER: str(retry_after), rules.USED_WEIGHT_HEADER: str(self._weight_used)},
        )

    def _weight_headers(self) -> dict[str, str]:
        return {rules.USED_WEIGHT_HEADER: str(self._weight_used)}

    async def _ping(self, request: web.Request) -> web.Response:
        if (refused := self._spend_weight(1)) is not None:
            return refused
        return web.json_response({}, headers=self._weight_headers())

    async def _time(self, request: web.Request) -> web.Response:
        if (refused := self._spend_weight(1)) is not None:
            return refused
        return web.json_response({"serverTime": self.now_ms()}, headers=self._weight_headers())

    async def _klines(self, request: web.Request) -> web.Response:
        self.stats.rest_requests += 1
        if (refused := self._spend_weight(rules.KLINES_REQUEST_WEIGHT)) is not None:
            return refused
        self._klines_requests += 1
        n = self._klines_requests
        if n in self.faults.rest_429_at:
            return self._too_many(self.faults.retry_after_s)
        if n in self.faults.rest_500_at:
            self.stats.rest_500 += 1
            return web.json_response({"code": -1000, "msg": "An unknown error occurred."}, status=500)
        q = request.query
        symbol, interval = q.get("symbol", ""), q.get("interval", "")
        try:
            limit = int(q.get("limit", "500"))
            start = int(q["startTime"]) if "startTime" in q else None
            end = int(q["endTime"]) if "endTime" in q else None
        except ValueError:
            return self._bad(-1100, "Illegal characters found in a parameter.")
        if interval not in INTERVAL_MS:
            return self._bad(-1120, "Invalid interval.")
        if not 1 <= limit <= rules.MAX_KLINES_PER_REQUEST:
            return self._bad(-1130, "Invalid data sent for a parameter: limit.")
        key = (symbol, interval)
        if key not in self.candles:
            return self._bad(-1121, "Invalid symbol.")
        ks, opens = self.candles[key], self._open_times[key]
        now = self.now_ms()
        # Candles that have opened by now: the closed ones and, like Binance, the one still in
        # progress (its values so far; clients must drop it by its close time).
        hi = bisect.bisect_right(opens, now if end is None else min(end, now))
        if start is not None:
            lo = bisect.bisect_left(opens, start)
            rows = ks[lo : min(hi, lo + limit)]
        else:
            rows = ks[max(0, hi - limit) : hi]
        if rows and rows[-1].close_time >= now:
            rows = [*rows[:-1], self._in_progress(key, rows[-1], now)]
        body = orjson.dumps([kline_to_rest_row(k) for k in rows])
        return web.Response(body=body, content_type="application/json", headers=self._weight_headers())

    def _in_progress(self, key: tuple[str, str], k: Kline, now: int) -> Kline:
        """Candle ``k`` as it stood at ``now`` (before its close): its last update sent by then,
        or, before the first one, a candle that has only just opened."""
        times, states = self._updates.get(key, ([], []))
        i = bisect.bisect_right(times, now) - 1
        if i >= 0 and states[i].open_time == k.open_time:
            return states[i]
        return replace(k, high=k.open, low=k.open, close=k.open, volume=0.0, quote_volume=0.0, trades=0,
                       taker_buy_base=0.0, taker_buy_quote=0.0, closed=False)

    def _bad(self, code: int, msg: str) -> web.Response:
        return web.json_response({"code": code, "msg": msg}, status=400, headers=self._weight_headers())


def stream_names(candles: Mapping[tuple[str, str], Sequence[Kline]]) -> list[str]:
    return [ws_stream_name(s, i) for s, i in candles]
