"""One INFO line a minute with what happened in it, instead of a line per event.

Operators read rates ("1,500 candles published in the last 60 s"); a line per candle at 500
streams is 500 lines a minute that bury the state changes. Counts are kept between lines and
the line is written by the first ``add`` after the period has passed (nothing is written while
nothing happens).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Callable


class MinuteLog:
    def __init__(
        self, logger: logging.Logger, what: str, order: tuple[str, ...], *, every_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.what = what
        self.order = order  # the counts named in the line, in this order (others follow)
        self.every_s = every_s
        self.clock = clock
        self.counts: Counter[str] = Counter()
        self._since = clock()

    def add(self, **counts: int) -> None:
        for name, n in counts.items():
            if n:
                self.counts[name] += n
        now = self.clock()
        if now - self._since >= self.every_s:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        if self.counts:
            names = [n for n in self.order if n in self.counts] + sorted(set(self.counts) - set(self.order))
            body = ", ".join(f"{self.counts[n]:,} {n.replace('_', ' ')}" for n in names)
            self.logger.info("%s: last %.0f s: %s", self.what, now - self._since, body,
                             extra={"period_s": round(now - self._since, 1), **dict(self.counts)})
        self.counts.clear()
        self._since = now
