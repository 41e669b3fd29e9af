"""Closed candles over REST (``GET /api/v3/klines``), within Binance's rate limits.

We use python-binance's ``AsyncClient`` and point its ``API_URL`` at
``KLINEBUS_BINANCE_REST_URL`` (the client builds every spot URL from that attribute), so the
same code talks to api.binance.com and to the simulator on loopback.

Rate limits: one request at a time per process; after every response we read the used weight
(``X-MBX-USED-WEIGHT-1M``) and, past our budget, wait for the next minute; a 429 stops every
request until ``Retry-After`` has passed (asking again inside it is what earns a 418 ban).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from binance import AsyncClient
from binance.exceptions import BinanceAPIException, BinanceRequestException

from libs.common.klines import InvalidKline, Kline, interval_ms, kline_from_row
from services.ingest import rules

log = logging.getLogger("klinebus.ingest.rest")

SERVER_ERROR_RETRIES = 5


class RestError(RuntimeError):
    pass


class RestKlines:
    def __init__(self, base_url: str, weight_budget: int = 3000, metrics: Any = None) -> None:
        if weight_budget > rules.REQUEST_WEIGHT_LIMIT_PER_MINUTE:
            raise ValueError(f"weight budget {weight_budget} exceeds Binance's {rules.REQUEST_WEIGHT_LIMIT_PER_MINUTE}/min")
        self.base_url = base_url.rstrip("/")
        self.weight_budget = weight_budget
        self.metrics = metrics
        self._client: AsyncClient | None = None
        self._gate = asyncio.Lock()
        self._resume_at = 0.0
        self.used_weight = 0

    def _get_client(self) -> AsyncClient:
        if self._client is None:
            client = AsyncClient()
            client.API_URL = f"{self.base_url}/api"
            self._client = client
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close_connection()
            self._client = None

    async def _call(self, method: str, **params: Any) -> Any:
        client = self._get_client()
        async with self._gate:
            attempt = 0
            while True:
                wait = self._resume_at - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                try:
                    result = await getattr(client, method)(**params)
                except BinanceAPIException as exc:
                    self._note_weight(exc.response)
                    self._count(str(exc.status_code))
                    if exc.status_code in (rules.HTTP_TOO_MANY_REQUESTS, rules.HTTP_IP_BANNED):
                        retry = _retry_after(exc.response)
                        self._resume_at = time.monotonic() + retry
                        log.warning("REST %s: HTTP %s, pausing all requests for %.0f s", method, exc.status_code, retry)
                        if self.metrics:
                            self.metrics.rest_throttled.inc()
                        continue
                    if exc.status_code >= 500 and attempt < SERVER_ERROR_RETRIES:
                        attempt += 1
                        await asyncio.sleep(min(0.2 * 2**attempt, 5.0))
                        continue
                    raise RestError(f"REST {method} failed: HTTP {exc.status_code} {exc.message}") from None
                except (BinanceRequestException, OSError, asyncio.TimeoutError) as exc:
                    self._count("error")
                    if attempt >= SERVER_ERROR_RETRIES:
                        raise RestError(f"REST {method} failed: {exc}") from None
                    attempt += 1
                    await asyncio.sleep(min(0.2 * 2**attempt, 5.0))
                    continue
                self._note_weight(client.response)
                self._count("200")
                return result

    def _count(self, status: str) -> None:
        if self.metrics:
            self.metrics.rest_requests.labels(status).inc()

    def _note_weight(self, response: Any) -> None:
        headers = getattr(response, "headers", None) or {}
        value = headers.get(rules.USED_WEIGHT_HEADER)
        if value is None:
            return
        self.used_weight = int(value)
        if self.metrics:
            self.metrics.rest_used_weight.set(self.used_weight)
        if self.used_weight >= self.weight_budget:
            # Binance counts weight per clock minute: wait for the next one.
            self._resume_at = max(self._resume_at, time.monotonic() + 60 - time.time() % 60)
            log.warning("REST weight %d reached our budget %d; pausing until the next minute", self.used_weight, self.weight_budget)

    async def server_time(self) -> int:
        return int((await self._call("get_server_time"))["serverTime"])

    async def closed_klines(self, symbol: str, interval: str, start: int, end: int | None = None) -> list[Kline]:
        """Every candle with ``start <= open_time <= end`` (end: now) that has closed, in order."""
        now = await self.server_time()
        step = interval_ms(interval)
        out: list[Kline] = []
        cursor = start
        while True:
            params: dict[str, Any] = dict(symbol=symbol, interval=interval, startTime=cursor, limit=rules.MAX_KLINES_PER_REQUEST)
            if end is not None:
                params["endTime"] = end
            rows = await self._call("get_klines", **params)
            for k in _closed_rows(rows, symbol, interval, now):
                if not out or k.open_time > out[-1].open_time:
                    out.append(k)
            if len(rows) < rules.MAX_KLINES_PER_REQUEST:
                return out
            cursor = int(rows[-1][0]) + step
            if end is not None and cursor > end:
                return out

    async def recent_closed_klines(self, symbol: str, interval: str, count: int, end: int | None = None) -> list[Kline]:
        """The newest ``count`` closed candles with ``open_time <= end`` (end: now), in order.

        Pages backwards with ``endTime`` (without ``startTime`` Binance returns the newest
        ``limit`` candles up to ``endTime``), so it needs no knowledge of where history begins."""
        now = await self.server_time()
        pages: list[list[Kline]] = []
        held = 0
        cursor = end if end is not None else now
        while held < count:
            # one more than needed: the newest row may be the candle still in progress
            limit = min(rules.MAX_KLINES_PER_REQUEST, count - held + 1)
            rows = await self._call("get_klines", symbol=symbol, interval=interval, endTime=cursor, limit=limit)
            page = _closed_rows(rows, symbol, interval, now)
            pages.append(page)
            held += len(page)
            if len(rows) < limit:
                break  # the exchange has no older candles of this stream
            cursor = int(rows[0][0]) - 1
        out: list[Kline] = []
        for k in sorted((k for page in pages for k in page), key=lambda k: k.open_time):
            if not out or k.open_time > out[-1].open_time:
                out.append(k)
        return out[-count:] if count else []


def _closed_rows(rows: list[list[Any]], symbol: str, interval: str, now: int) -> list[Kline]:
    """The valid rows of a klines response whose candle has closed by ``now`` (exchange clock):
    Binance also returns the candle still in progress."""
    out = []
    for row in rows:
        try:
            k = kline_from_row(row, symbol, interval)
        except InvalidKline as exc:
            log.warning("REST %s %s: skipping an invalid row: %s", symbol, interval, exc.reason)
            continue
        if k.close_time < now:
            out.append(k)
    return out


def _retry_after(response: Any) -> float:
    headers = getattr(response, "headers", None) or {}
    try:
        return max(float(headers.get(rules.RETRY_AFTER_HEADER, "")), 0.0) or 1.0
    except ValueError:
        return 60.0  # no usable hint: a whole weight window
