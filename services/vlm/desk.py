"""The vlm's waiting room as a component: which chart goes to the model next and what each
outcome means. No Redis here.

``Desk`` is told each chart as it arrives (``offer``: latest wins per symbol/interval) and works
one chart at a time (``step``). It reaches the outside through two ports: a ``WaitingRoom``
(the records and leases; ``pending.PendingCharts`` keeps them in Redis so a kill loses nothing
and replicas share them) and a ``DeskPort`` (the candles and the image a chart shows, the
dead-letter stream, publishing an analysis). The app implements both over Redis; the tests
implement them with dicts.

Outcomes, per chart taken: an answer is published (once per candle) and the chart is done;
a chart that cannot be analysed (undecodable, its candles or image missing, a refused or timed-out
answer, a model error) is a dead letter with the reason and is done; a backend that is down gives
the chart back to wait, up to ``backend_attempts`` tries, then it is a dead letter too. A bug in
any of that is a dead letter for that chart alone: the desk goes on with the next one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from libs.common.contracts import AnalysisEvent, ChartEvent, InvalidEvent
from libs.llm.runtime import BackendUnavailable, CallTimeout, InputError, LLMError
from services.vlm.analysis import PriceFrame
from services.vlm.analyst import AnalysisRefused, Analyst, analysis_event
from services.vlm.image import UnreadableImage

log = logging.getLogger("klinebus.vlm")

# The longest a chart whose backend was down waits before its next try (the model retry
# setting may be longer: that is for loading the model, not for one chart).
BACKEND_RETRY_CAP_S = 5.0


class ChartUnusable(ValueError):
    """The chart names candles that are not on klines.v1."""


class WaitingRoom(Protocol):
    async def offer(self, symbol: str, interval: str, open_time: int, chart_json: bytes) -> tuple[bool, int | None]: ...

    async def waiting(self) -> list[tuple[str, int]]: ...

    async def take(self, field: str, open_time: int, owner: str, lease_ms: int) -> bytes | None: ...

    async def release(self, field: str, open_time: int) -> None: ...

    async def release_owned(self, owner: str) -> int: ...

    async def done(self, field: str, open_time: int) -> bool: ...

    async def count(self) -> int: ...


class DeskPort(Protocol):
    async def frame_of(self, chart: ChartEvent) -> PriceFrame:
        """The candles the chart shows (``ChartUnusable`` when they are not all there)."""

    async def image_of(self, chart: ChartEvent) -> bytes:
        """The chart's PNG, bounded for the model (``UnreadableImage``)."""

    async def dead_letter(self, raw: bytes, reason: str) -> None: ...

    async def publish(self, event: AnalysisEvent, frame: PriceFrame) -> bool:
        """Publish once per candle and record it for scoring; False when it was not appended."""


@dataclass
class DeskMetrics:
    skipped: Any  # counter by why
    outcomes: Any  # counter by result
    retries: Any  # counter
    backend_errors: Any  # counter
    phase_seconds: Any  # histogram by phase


class Desk:
    def __init__(
        self,
        room: WaitingRoom,
        port: DeskPort,
        metrics: DeskMetrics,
        *,
        consumer: str,
        lease_ms: int,
        presets: Any,
        backend_attempts: int,
        backend_retry_s: float,
        on_backend: Callable[[bool], None] = lambda ok: None,
    ) -> None:
        self.room = room
        self.port = port
        self.m = metrics
        self.consumer = consumer
        self.lease_ms = lease_ms
        self.presets = presets
        self.backend_attempts = backend_attempts
        self.backend_retry_s = backend_retry_s
        self.on_backend = on_backend
        self.backend_failures: dict[tuple[str, int], int] = {}
        self.waiting = 0  # charts waiting at the last look (a gauge reads it)
        self.wake = asyncio.Event()  # set by a new chart: look again now

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> int:
        """Give back what this consumer name held when it stopped; returns how many."""
        taken_back = await self.room.release_owned(self.consumer)
        if taken_back:
            log.info("vlm: %d chart(s) this replica held when it stopped are waiting again", taken_back)
        return taken_back

    async def offer(self, event: ChartEvent) -> str:
        """Record a chart: ``recorded``, ``superseded`` (it replaced an older one), ``stale`` (a
        newer one waits) or ``preset`` (not a preset this service analyses)."""
        if event.preset not in self.presets:
            self.m.skipped.labels("preset").inc()
            return "preset"
        recorded, other = await self.room.offer(event.symbol, event.interval, event.open_time, event.to_json())
        self.wake.set()
        if not recorded:
            self.m.skipped.labels("stale").inc()
            return "stale"
        if other is not None:
            self.m.skipped.labels("superseded").inc()
            return "superseded"
        return "recorded"

    async def step(self, analyst: Analyst, backend: Any) -> bool:
        """Take the oldest waiting chart this replica can lease and see it through; False when
        there was none (the caller waits for ``wake`` or a poll)."""
        self.wake.clear()
        todo = await self.room.waiting()
        self.waiting = len(todo)
        for field, open_time in todo:
            raw = await self.room.take(field, open_time, self.consumer, self.lease_ms)
            if raw is None:
                continue
            try:
                await self.handle(analyst, backend, field, open_time, raw)
            except Exception as exc:  # noqa: BLE001 - one chart that trips a bug must not stop the desk
                log.exception("vlm: analysing %s failed unexpectedly", field)
                await self.refuse(raw, "error", f"{type(exc).__name__}: {exc}")
                await self.room.done(field, open_time)
            return True  # look again: newer charts may have replaced the others meanwhile
        return False

    # --- one chart ---------------------------------------------------------------------------

    async def refuse(self, raw: bytes, why: str, reason: str) -> None:
        self.m.outcomes.labels(why).inc()
        await self.port.dead_letter(raw, f"vlm {why}: {reason}")

    async def handle(self, analyst: Analyst, backend: Any, field: str, open_time: int, raw: bytes) -> None:
        try:
            chart = ChartEvent.from_json(raw)
        except InvalidEvent as exc:
            await self.refuse(raw, "invalid", exc.reason)
            await self.room.done(field, open_time)
            return
        try:
            frame = await self.port.frame_of(chart)
            started = time.perf_counter()
            png = await self.port.image_of(chart)
            prep_ms = (time.perf_counter() - started) * 1000.0
            result = await analyst.analyse(chart, frame, png)
        except BackendUnavailable as exc:
            self.m.backend_errors.inc()
            self.on_backend(False)
            key = (field, open_time)
            tries = self.backend_failures.pop(key, 0) + 1
            if tries >= self.backend_attempts:
                await self.refuse(raw, "backend_down", str(exc))
                await self.room.done(field, open_time)
            else:
                self.backend_failures[key] = tries
                log.warning("vlm backend unavailable, %s %s waits: %s", chart.symbol, chart.interval, exc)
                await self.room.release(field, open_time)
                await asyncio.sleep(min(self.backend_retry_s, BACKEND_RETRY_CAP_S))
            return
        except (ChartUnusable, UnreadableImage) as exc:
            await self.refuse(raw, "unusable_chart", str(exc))
        except CallTimeout as exc:
            await self.refuse(raw, "timeout", str(exc))
        except AnalysisRefused as exc:
            self.m.retries.inc()
            await self.refuse(raw, "refused", exc.reason)
        except InputError as exc:
            await self.refuse(raw, "input", str(exc))
        except LLMError as exc:
            await self.refuse(raw, "model_error", str(exc))
        else:
            self.on_backend(True)
            self.m.retries.inc(result.attempts - 1)
            event = analysis_event(
                chart, frame, result, model=backend.model_name, revision=backend.revision, backend=backend.kind,
                image_prep_ms=prep_ms,
            )
            for phase, ms in event.timings_ms.items():
                self.m.phase_seconds.labels(phase).observe(ms / 1000.0)
            appended = await self.port.publish(event, frame)
            self.m.outcomes.labels("published" if appended else "duplicate").inc()
        self.backend_failures.pop((field, open_time), None)
        await self.room.done(field, open_time)
