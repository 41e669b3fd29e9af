"""Micro-batching per model and ordered publishing, as plain asyncio (no bus).

``MicroBatcher``: one per served model name. Jobs (one window each) queue up; the worker
takes the first and whatever else arrives within ``max_wait_s`` (up to ``max_batch``), runs
the model once for all of them in the model's own thread, and hands the results on in the
order the jobs came. Each model has its own queue, task and thread, so a slow model only
delays itself. It works the same whether the bus delivers events one at a time or in
batches: batching happens here, across events, not per delivery.

``Outbox``: one per output topic. Events are published in the order they were put, in
pipelined batches; a failed publish (Redis down) is retried with capped back-off, never
dropped, so what the workers produced reaches the stream in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

import numpy as np

log = logging.getLogger("klinebus.inference.batching")

RETRY_FIRST_S = 0.05
RETRY_MAX_S = 5.0


@dataclass
class Job:
    model: Any  # an OnnxModel (or anything with ``predict(windows, last_close)``)
    symbol: str
    interval: str
    open_time: int
    window: np.ndarray
    last_close: float
    meta: dict[str, Any] = field(default_factory=dict)


Results = Callable[[Sequence[Job], Sequence[Any]], Awaitable[None]]


class _QueueWorker:
    """One queue, one task working it; ``pending`` counts queued items and the one in hand."""

    name: str
    _queue: asyncio.Queue
    _task: asyncio.Task[None] | None = None
    _busy: bool = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"{type(self).__name__}:{self.name}")

    async def _run(self) -> None:
        raise NotImplementedError

    @property
    def pending(self) -> int:
        return self._queue.qsize() + (1 if self._busy else 0)

    async def drain(self, timeout: float) -> bool:
        """Wait until everything queued is handled (or ``timeout``); True when empty."""
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        return not self.pending

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class MicroBatcher(_QueueWorker):
    """Batches jobs for one model name; ``on_results(jobs, forecasts_or_errors)`` gets them in order."""

    def __init__(
        self,
        name: str,
        on_results: Results,
        max_batch: int = 256,
        max_wait_s: float = 0.002,
    ) -> None:
        self.name = name
        self.on_results = on_results
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{name}")
        self._task: asyncio.Task[None] | None = None
        self._busy = False


    def submit(self, job: Job) -> None:
        self._queue.put_nowait(job)

    async def _collect(self) -> list[Job]:
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except asyncio.TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            self._busy = True
            try:
                # A hot reload swaps the model between two candles: jobs name the version that was
                # current when their candle arrived, so a batch may hold two versions, run apart.
                start = 0
                while start < len(batch):
                    end = start
                    while end < len(batch) and batch[end].model is batch[start].model:
                        end += 1
                    group = batch[start:end]
                    results = await loop.run_in_executor(self._executor, _predict, group)
                    await self.on_results(group, results)
                    start = end
            finally:
                self._busy = False

    async def stop(self) -> None:
        await super().stop()
        self._executor.shutdown(wait=False, cancel_futures=True)


def _predict(jobs: Sequence[Job]) -> list[Any]:
    """Runs in the model's thread: one session call for the group, or the error for every job."""
    model = jobs[0].model
    t0 = time.perf_counter()
    try:
        windows = np.stack([j.window for j in jobs])
        closes = np.asarray([j.last_close for j in jobs], dtype=np.float64)
        out = model.predict(windows, closes)
    except Exception as exc:  # noqa: BLE001 - reported per job by the caller (dead letter + metric)
        return [exc] * len(jobs)
    elapsed = time.perf_counter() - t0
    for j in jobs:
        j.meta["session_s"] = elapsed
        j.meta["batch"] = len(jobs)
    return list(out)


@dataclass
class _Item:
    event: Any
    key: tuple[str, ...]


class Outbox(_QueueWorker):
    """Publishes events in order through ``publish(events, *key)`` (e.g. ``OncePerCandle.publish_many``),
    batching consecutive events of one key; retries failures with capped back-off."""

    def __init__(self, name: str, publish: Callable[..., Awaitable[Any]], max_batch: int = 500) -> None:
        self.name = name
        self.publish = publish
        self.max_batch = max_batch
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._busy = False
        self.failing: str | None = None  # why publishing is failing now (for logs and health)


    def put(self, event: Any, *key: str) -> None:
        self._queue.put_nowait(_Item(event, key))

    async def _run(self) -> None:
        while True:
            items = [await self._queue.get()]
            while len(items) < self.max_batch and not self._queue.empty():
                items.append(self._queue.get_nowait())
            self._busy = True
            try:
                start = 0
                while start < len(items):
                    end = start
                    while end < len(items) and items[end].key == items[start].key:
                        end += 1
                    await self._publish_retrying([i.event for i in items[start:end]], items[start].key)
                    start = end
            finally:
                self._busy = False

    async def _publish_retrying(self, events: list[Any], key: tuple[str, ...]) -> None:
        delay = RETRY_FIRST_S
        while True:
            try:
                await self.publish(events, *key)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis away: wait it out, lose nothing
                reason = f"{type(exc).__name__}: {exc}"
                if reason != self.failing:
                    log.warning("%s: publishing %d events failed (%s); retrying", self.name, len(events), reason)
                self.failing = reason
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX_S, delay * 2)
                continue
            if self.failing:
                log.info("%s: publishing works again", self.name)
                self.failing = None
            return

