"""When to render: a fixed schedule per (symbol, interval) plus requests, latest-wins when behind.

Pure domain logic with an injectable clock; the app feeds it keys and
requests and pulls jobs when a renderer is free. At most one job is pending
per (symbol, interval, preset): a newer one replaces it (a chart of the
newest candles is worth more than a late chart of older ones), and every
replaced job or missed tick is counted.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

Key = tuple[str, str, str]  # symbol, interval, preset


@dataclass(frozen=True)
class ChartJob:
    symbol: str
    interval: str
    preset: str
    window: int | None = None
    reason: str = "schedule"  # or "request"
    requested_by: str = ""

    @property
    def key(self) -> Key:
        return (self.symbol, self.interval, self.preset)


@dataclass
class CadenceStats:
    enqueued: int = 0
    replaced: int = 0  # a pending job superseded by a newer one before it ran
    missed_ticks: int = 0  # schedule ticks that passed while the service was behind or stopped
    by_key: dict[Key, int] = field(default_factory=dict)  # replaced + missed, per key

    @property
    def skipped(self) -> int:
        return self.replaced + self.missed_ticks


class Cadence:
    def __init__(self, every_s: float, preset: str = "analysis", clock: Callable[[], float] = time.monotonic) -> None:
        if every_s <= 0:
            raise ValueError(f"cadence must be > 0 seconds, got {every_s}")
        self.every_s = every_s
        self.preset = preset
        self.clock = clock
        self._next_due: dict[tuple[str, str], float] = {}
        self._pending: OrderedDict[Key, ChartJob] = OrderedDict()
        self.stats = CadenceStats()

    def track(self, symbol: str, interval: str) -> None:
        """Start the schedule of a key; its first chart is due now."""
        self._next_due.setdefault((symbol, interval), self.clock())

    @property
    def tracked(self) -> list[tuple[str, str]]:
        return list(self._next_due)

    def tick(self) -> int:
        """Enqueue every key whose time has come; returns how many were enqueued."""
        now = self.clock()
        n = 0
        for (symbol, interval), due in self._next_due.items():
            if due > now:
                continue
            missed = int(math.floor((now - due) / self.every_s))
            if missed:
                self.stats.missed_ticks += missed
                key = (symbol, interval, self.preset)
                self.stats.by_key[key] = self.stats.by_key.get(key, 0) + missed
            self._next_due[(symbol, interval)] = due + (missed + 1) * self.every_s
            self.enqueue(ChartJob(symbol, interval, self.preset))
            n += 1
        return n

    def enqueue(self, job: ChartJob) -> None:
        """Queue ``job``, replacing a pending one of the same key (which keeps its queue place)."""
        self.stats.enqueued += 1
        if job.key in self._pending:
            self.stats.replaced += 1
            self.stats.by_key[job.key] = self.stats.by_key.get(job.key, 0) + 1
        self._pending[job.key] = job

    def next_job(self) -> ChartJob | None:
        """The oldest pending job, removed from the queue; None when idle."""
        if not self._pending:
            return None
        _, job = self._pending.popitem(last=False)
        return job

    def seconds_to_next(self) -> float:
        """How long until the next scheduled key is due (0 when something is pending)."""
        if self._pending:
            return 0.0
        if not self._next_due:
            return self.every_s
        return max(0.0, min(self._next_due.values()) - self.clock())

    def __len__(self) -> int:
        return len(self._pending)
