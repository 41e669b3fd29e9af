"""Getting one notification to one destination: a rate limit per destination, retries with
exponential backoff and jitter, a 429's ``retry_after`` honoured, and a verdict: delivered,
refused for good (dead-letter it), or still failing (the destination owes it; paid later)."""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

import aiohttp

from services.alerts.notification import Notification
from services.alerts.sinks.base import DeliveryError, Sink

log = logging.getLogger("klinebus.alerts.delivery")


class RateLimiter:
    """A token bucket (``per_minute`` tokens a minute, at most ``burst`` saved), plus pauses a
    destination asked for (a 429's retry_after, an empty bucket announced in headers). Waiters are
    served in arrival order. ``per_minute`` 0: no limit, pauses still apply."""

    def __init__(self, per_minute: float, burst: int = 1, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = per_minute / 60.0
        self.burst = max(1, burst)
        self.clock = clock
        self.tokens = float(self.burst)
        self.updated = clock()
        self.paused_until = 0.0
        self._lock = asyncio.Lock()

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, self.clock() + seconds)

    def _wait_needed(self) -> float:
        now = self.clock()
        if now < self.paused_until:
            return self.paused_until - now
        if self.rate <= 0:
            return 0.0
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate

    async def acquire(self) -> None:
        async with self._lock:
            while (wait := self._wait_needed()) > 0:
                await asyncio.sleep(wait)
            if self.rate > 0:
                self.tokens -= 1


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    initial_s: float = 1.0
    max_s: float = 60.0
    max_retry_after_s: float = 300.0

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Delay before try ``attempt + 1``: doubling from ``initial_s``, capped, with jitter in
        [50 %, 100 %] so replicas that failed together do not retry together."""
        base = min(self.max_s, self.initial_s * 2 ** (attempt - 1))
        return base * (0.5 + 0.5 * (rng or random).random())


class Outcome(str, enum.Enum):
    DELIVERED = "delivered"
    DEAD_LETTERED = "dead_lettered"  # refused for good (4xx other than 429/408)
    PENDING = "pending"  # still failing after every try: owed, paid at a later tick


@dataclass(frozen=True)
class Result:
    sink: str
    outcome: Outcome
    reason: str = ""
    attempts: int = 0


class Destination:
    """One sink with its limiter and retry policy."""

    def __init__(
        self,
        sink: Sink,
        limiter: RateLimiter,
        policy: RetryPolicy,
        session: Callable[[], aiohttp.ClientSession],
        metrics: Any,
    ) -> None:
        self.sink = sink
        self.limiter = limiter
        self.policy = policy
        self._session = session
        self.metrics = metrics

    @property
    def name(self) -> str:
        return self.sink.name

    async def call(self, send: Callable[[aiohttp.ClientSession], Any], context: dict[str, Any]) -> Result:
        """Run ``send`` (one request) under the limiter, retrying as the policy says."""
        reason = ""
        for attempt in range(1, self.policy.attempts + 1):
            await self.limiter.acquire()
            started = time.perf_counter()
            try:
                headers = await send(self._session())
            except DeliveryError as exc:
                reason = exc.reason
                kind = "permanent" if exc.permanent else "rate_limited" if exc.retry_after is not None else "error"
                self.metrics.attempts.labels(self.name, kind).inc()
                if exc.permanent:
                    return Result(self.name, Outcome.DEAD_LETTERED, reason, attempt)
                if exc.retry_after is not None and exc.retry_after > self.policy.max_retry_after_s:
                    log.warning("%s asks to wait %.0fs; leaving it for later", self.name, exc.retry_after,
                                extra={**context, "sink": self.name})
                    return Result(self.name, Outcome.PENDING, reason, attempt)
                if attempt == self.policy.attempts:
                    break
                if exc.retry_after is not None:
                    self.limiter.pause(exc.retry_after)  # every request to it waits, not only this one
                    delay = 0.0
                else:
                    delay = self.policy.backoff(attempt)
                log.warning("%s; try %d of %d failed, retrying in %.1fs", reason, attempt, self.policy.attempts,
                            max(delay, exc.retry_after or 0.0), extra={**context, "sink": self.name})
                await asyncio.sleep(delay)
                continue
            self.metrics.request_seconds.labels(self.name).observe(time.perf_counter() - started)
            self.metrics.attempts.labels(self.name, "ok").inc()
            pause = self.sink.rate_limit_pause(headers or {})
            if pause:
                self.limiter.pause(pause)
            return Result(self.name, Outcome.DELIVERED, "", attempt)
        return Result(self.name, Outcome.PENDING, reason, self.policy.attempts)

    async def deliver(self, n: Notification) -> Result:
        return await self.call(lambda session: self.sink.send(session, n), n.log_context())
