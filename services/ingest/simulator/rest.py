"""The simulator's REST side, as Binance's spot API behaves.

``GET /api/v3/klines`` (the candles opened by the simulated clock, the one still in progress
included with its values so far, as Binance does), ``/api/v3/ping`` and ``/api/v3/time``,
with request weights, 429 + ``Retry-After`` and a 418 for a client that does not back off.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import replace
from typing import Callable, Mapping, Sequence

import orjson
from aiohttp import web

from libs.common.klines import INTERVAL_MS, Kline, kline_to_rest_row
from services.ingest import rules
from services.ingest.simulator.faults import FaultPlan
from services.ingest.simulator.stats import SimulatorStats
from services.ingest.simulator.tape import TapeEvent


class RestFront:
    def __init__(
        self,
        candles: Mapping[tuple[str, str], Sequence[Kline]],
        tape: Sequence[TapeEvent],
        faults: FaultPlan,
        stats: SimulatorStats,
        now_ms: Callable[[], int],
    ) -> None:
        self.candles = candles
        self.faults = faults
        self.stats = stats
        self.now_ms = now_ms
        self._open_times = {key: [k.open_time for k in ks] for key, ks in candles.items()}
        # in-progress states per stream, by send time: what REST shows for a candle still open
        self._updates: dict[tuple[str, str], tuple[list[int], list[Kline]]] = {}
        for e in tape:
            if not e.closed:
                times, states = self._updates.setdefault((e.kline.symbol, e.kline.interval), ([], []))
                times.append(e.time)
                states.append(e.kline)
        self._weight_window = 0
        self._weight_used = 0
        self._banned_until = 0.0
        self._klines_requests = 0

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/api/v3/klines", self._klines)
        app.router.add_get("/api/v3/ping", self._ping)
        app.router.add_get("/api/v3/time", self._time)

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

