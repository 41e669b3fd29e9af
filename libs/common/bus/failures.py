"""Failures classified once, in the bus edge.

Three kinds, three treatments:

* **bad input** (undecodable, invalid, impossible: ``BAD_INPUT_ERRORS``): the entry is
  dead-lettered with the reason and acknowledged; it can never succeed.
* **infrastructure** (every ``redis.exceptions`` error that is not a bad command: connection
  and timeout errors, ``LOADING``, ``READONLY``, ``OOM``, ``CLUSTERDOWN``, ``TRYAGAIN``,
  ``MASTERDOWN``, ``NOREPLICAS``, ``BUSY``, a lost group; plus OS and network errors):
  waited out with capped exponential back-off and jitter, for as long as it lasts. The
  consumer does not move on meanwhile; ``Stall`` logs one line when it starts, one when the
  reason changes and one when it ends, and sets a gauge with the reason.
* **domain bug** (anything else, e.g. a ``ZeroDivisionError`` in a handler, or a bad command):
  retried ``HANDLER_ATTEMPTS`` times in place, then dead-lettered with the traceback's last line.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import traceback

import redis.exceptions as rex

from libs.common.bus.framing import BAD_INPUT_ERRORS

log = logging.getLogger("klinebus.bus")

# How many times an entry whose handler fails with a domain error is tried before it is
# dead-lettered, and the back-off between those tries.
HANDLER_ATTEMPTS = 5
RETRY_FIRST_S = 0.1
RETRY_MAX_S = 5.0
# Back-off while the infrastructure is down: first wait, cap.
INFRA_FIRST_S = 0.05
INFRA_MAX_S = 5.0

INFRASTRUCTURE = "infrastructure"
BAD_INPUT = "bad_input"
BUG = "bug"

# Error replies that mean "the server cannot take this now", whatever class redis-py gave them:
# the first word of a plain reply, or the text inside a Lua script's error (where every error
# arrives as a generic ResponseError, e.g. "... @user_script:7: -OOM command not allowed ...").
_TRANSIENT_WORDS = frozenset(
    ("LOADING", "READONLY", "OOM", "CLUSTERDOWN", "TRYAGAIN", "MASTERDOWN", "NOREPLICAS", "BUSY",
     "NOGROUP", "MISCONF", "NOAUTH", "NOPERM", "UNBLOCKED", "MOVED", "ASK")
)
_TRANSIENT_TEXT = (
    "command not allowed when used memory", "can't write against a read only replica", "NOGROUP",
    "-OOM", "-READONLY", "-LOADING", "-CLUSTERDOWN", "-TRYAGAIN", "-MASTERDOWN", "-NOREPLICAS", "-BUSY", "-MISCONF",
)


def classify(exc: BaseException) -> str:
    """``bad_input``, ``infrastructure`` or ``bug``."""
    if isinstance(exc, BAD_INPUT_ERRORS):
        return BAD_INPUT
    if isinstance(exc, (rex.ReadOnlyError, rex.OutOfMemoryError, rex.BusyLoadingError, rex.ClusterDownError,
                        rex.TryAgainError, rex.MasterDownError, rex.AskError, rex.MovedError,
                        rex.NoPermissionError)):  # NOPERM: redis-py drops the word; the ACL is fixed, not the event
        return INFRASTRUCTURE
    if isinstance(exc, rex.ResponseError):
        text = str(exc)
        first = text.split(" ", 1)[0].upper()
        if first in _TRANSIENT_WORDS or any(t in text for t in _TRANSIENT_TEXT):
            return INFRASTRUCTURE
        return BUG  # a bad command: a bug in our code, not a state of the server
    if isinstance(exc, rex.DataError):
        return BUG
    if isinstance(exc, (rex.RedisError, OSError, asyncio.TimeoutError, TimeoutError, ConnectionError)):
        return INFRASTRUCTURE
    return BUG


_KIND_BY_TYPE = (
    (rex.OutOfMemoryError, "oom"), (rex.ReadOnlyError, "readonly"), (rex.BusyLoadingError, "loading"),
    (rex.ClusterDownError, "clusterdown"), (rex.TryAgainError, "tryagain"), (rex.MasterDownError, "masterdown"),
    (rex.NoPermissionError, "noperm"),
)


def reason_kind(exc: BaseException) -> str:
    """A bounded label for the stalled gauge: the error's kind, not its details."""
    # By type first: inside a transaction redis-py rewords the server's error ("Command # 1 (...)
    # of pipeline caused error: command not allowed when used memory > 'maxmemory'").
    for kind, word in _KIND_BY_TYPE:
        if isinstance(exc, kind):
            return word
    text = str(exc)
    for word in ("OOM", "READONLY", "LOADING", "CLUSTERDOWN", "TRYAGAIN", "MASTERDOWN", "NOGROUP", "BUSY"):
        if word in text:
            return word.lower()
    if isinstance(exc, (rex.ConnectionError, ConnectionError)):
        return "connection"
    if isinstance(exc, (rex.TimeoutError, asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    return type(exc).__name__[:40]


def last_line(exc: BaseException) -> str:
    """The traceback's last line (``Type: message``) and where it was raised."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    tb = traceback.extract_tb(exc.__traceback__)
    if tb:
        frame = tb[-1]
        text += f" (at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} in {frame.name})"
    return text


def reason_label(reason: str) -> str:
    """A bounded label value for dead letters: the reason's kind (keeps Prometheus cardinality low)."""
    head = reason.split(":")[0].strip()
    for word in ("malformed JSON", "not a kline", "high", "close_time", "unknown interval", "symbol"):
        if word in reason:
            return word.replace(" ", "_")
    if reason.startswith("handler failed"):
        return "handler_failed"
    return head[:40] if head.isidentifier() else "invalid"


class Backoff:
    """Capped exponential back-off with full jitter (AWS style: sleep U(cap/2, cap))."""

    def __init__(self, first: float, cap: float) -> None:
        self.first, self.cap, self.tries = first, cap, 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.first * 2 ** min(self.tries, 20))
        self.tries += 1
        return random.uniform(ceiling / 2, ceiling)

    async def sleep(self) -> None:
        await asyncio.sleep(self.next_delay())

    def reset(self) -> None:
        self.tries = 0


class Stall:
    """One consumer's "waiting out the infrastructure" state: a line per change, a gauge."""

    def __init__(self, who: str, gauge=None) -> None:
        self.who = who
        self.gauge = gauge  # labelled by reason; None in tools without metrics
        self.reason: str | None = None
        self.since = 0.0
        self.backoff = Backoff(INFRA_FIRST_S, INFRA_MAX_S)

    async def wait(self, exc: BaseException, doing: str) -> None:
        kind = reason_kind(exc)
        if kind != self.reason:
            if self.reason is None:
                self.since = time.monotonic()
                log.warning("%s: stalled while %s: %s; waiting it out", self.who, doing, " ".join(str(exc).split())[:300])
            else:
                log.warning("%s: still stalled, now %s while %s: %s", self.who, kind, doing, str(exc)[:300])
                self._set(self.reason, 0)
            self.reason = kind
            self._set(kind, 1)
        await self.backoff.sleep()

    def clear(self) -> None:
        if self.reason is None:
            return
        log.info("%s: resumed after %.1fs stalled (%s)", self.who, time.monotonic() - self.since, self.reason)
        self._set(self.reason, 0)
        self.reason = None
        self.backoff.reset()

    @property
    def stalled(self) -> bool:
        return self.reason is not None

    def _set(self, reason: str, value: int) -> None:
        if self.gauge is not None:
            self.gauge(reason).set(value)
