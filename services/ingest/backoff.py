"""Reconnect pacing: exponential backoff with full jitter, and the connection-attempt budget."""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque

from services.ingest import rules


class Backoff:
    """Delays ``initial * 2**n`` capped at ``maximum``, each drawn uniformly in [0, cap]
    ("full jitter"), so replicas that lost the exchange together do not return together."""

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        if initial <= 0 or maximum < initial:
            raise ValueError(f"need 0 < initial <= maximum, got initial={initial} maximum={maximum}")
        self.initial = initial
        self.maximum = maximum
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        cap = min(self.maximum, self.initial * (2**self.attempt))
        self.attempt += 1
        return self._rng.uniform(cap / 2, cap) if self.attempt == 1 else self._rng.uniform(0, cap)

    def reset(self) -> None:
        self.attempt = 0


class ConnectionBudget:
    """At most ``limit`` connection attempts per ``window_s`` (Binance: 300 per 5 minutes per IP;
    we keep ``rules.CONNECTION_ATTEMPTS_BUDGET``). ``acquire`` waits for a free slot."""

    def __init__(self, limit: int = rules.CONNECTION_ATTEMPTS_BUDGET, window_s: float = rules.CONNECTION_WINDOW_S) -> None:
        if not 0 < limit <= rules.MAX_CONNECTIONS_PER_WINDOW:
            raise ValueError(f"connection budget must be in 1..{rules.MAX_CONNECTIONS_PER_WINDOW}, got {limit}")
        self.limit = limit
        self.window_s = window_s
        self._attempts: deque[float] = deque()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                while self._attempts and now - self._attempts[0] >= self.window_s:
                    self._attempts.popleft()
                if len(self._attempts) < self.limit:
                    self._attempts.append(now)
                    return
                await asyncio.sleep(self.window_s - (now - self._attempts[0]))


class Pacer:
    """Spaces our own control messages (SUBSCRIBE...) at ``rate`` per second on one connection."""

    def __init__(self, rate: float = rules.CONTROL_MESSAGES_PER_SECOND) -> None:
        self.interval = 1.0 / rate
        self._next = 0.0

    async def wait(self) -> None:
        now = time.monotonic()
        if self._next > now:
            await asyncio.sleep(self._next - now)
        self._next = max(now, self._next) + self.interval
