"""Micro-batching per model and ordered publishing, as plain asyncio (no bus).

``MicroBatcher``: one per served model name. Jobs (one window each) gather into a batch that
starts in the model's own threads as soon as it holds ``max_batch`` jobs or ``max_wait_s`` after
its first, so the model runs while the loop is still cutting the rest of a delivery's windows,
up to ``calls`` batches side by side; each result is handed on in the order the jobs came. Each model has its own queue, task and thread, so a slow model only
delays itself. It works the same whether the bus delivers events one at a time or in
batches: batching happens here, across events, not per delivery.

``ChartBatcher``: the same for a chart classifier (``charts.v1``): chart jobs gathered into one
``ChartModel.predict_many`` call, each caller awaiting its own answers (``answer``).

``Outbox``: one per output topic. Events are published in the order they were put, in
pipelined batches of one key, so what the workers produced reaches the stream in order.

Both are supervised (``_QueueWorker``): what a worker holds is kept "in hand" until it is
handed on, so a failure loses nothing. A failure the port calls transient (Redis down,
OOM, read-only) is waited out with capped back-off for as long as it lasts, nothing dropped;
any other failure of one item (a bug, an event Redis will never take) is tried ``max_tries``
times, then that item alone is dead-lettered and the worker moves on. Either way the worker
restarts itself, and ``failing`` says why while it is down (``/readyz`` and a gauge read it),
so one bad item never ends the task for good nor blocks the topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

import numpy as np

log = logging.getLogger("klinebus.inference.batching")

RETRY_FIRST_S = 0.05
RETRY_MAX_S = 5.0
# Tries of one item failing with a non-transient error before it is dead-lettered: enough to
# ride out a race, few enough that the topic behind it waits well under a second.
MAX_TRIES = 5


@dataclass
class Job:
    model: Any  # an OnnxModel (or anything with ``predict(windows, last_close)``)
    symbol: str
    interval: str
    open_time: int
    window: np.ndarray
    last_close: float
    meta: dict[str, Any] = field(default_factory=dict)


OnResult = Callable[[Job, Any], Awaitable[None]]
OnSession = Callable[[Sequence[Job]], None]
Transient = Callable[[BaseException], bool]
GiveUp = Callable[[Any, str], Awaitable[None]]
OnRestart = Callable[[str, BaseException], None]
RunBatch = Callable[[Sequence[Job]], list[Any]]  # a group of one model's jobs -> a result or error per job


def connection_trouble(exc: BaseException) -> bool:
    """The default transient test when no port gives one: network-level errors only."""
    return isinstance(exc, (ConnectionError, TimeoutError, OSError))


class _Poison(Exception):
    """Raised by ``_run`` when the item in hand was tried ``max_tries`` times (internal)."""


@dataclass
class _InHand:
    item: Any
    tries: int = 0


class _QueueWorker:
    """One queue, one supervised task working it; ``pending`` counts queued items and those in hand.

    Subclasses implement ``_fill`` (wait for work, put it in ``_hand``), ``_handle`` (hand the
    head item on; raise to fail), ``_split`` (a failing item that can be tried in smaller parts)
    and ``_give_up`` (dead-letter an item that kept failing)."""

    name: str
    _queue: asyncio.Queue
    _task: asyncio.Task[None] | None = None

    def _init_worker(self, transient: Transient | None, max_tries: int, on_restart: OnRestart | None) -> None:
        self._hand: list[_InHand] = []
        self._task = None
        self.transient = transient or connection_trouble
        self.max_tries = max_tries
        self.on_restart = on_restart
        self.failing: str | None = None  # why the worker is down now (for logs and /readyz)
        self.restarts = 0
        self._delay = RETRY_FIRST_S

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._supervise(), name=f"{type(self).__name__}:{self.name}")

    @property
    def ok(self) -> bool:
        """Working (or not started yet): not failing, and its task has not ended."""
        return self.failing is None and (self._task is None or not self._task.done())

    @property
    def pending(self) -> int:
        return self._queue.qsize() + len(self._hand)

    async def _supervise(self) -> None:
        while True:
            try:
                await self._run()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure restarts the worker; none ends it
                await self._failed(exc)

    async def _run(self) -> None:
        while True:
            if not self._hand:
                await self._fill()
            while self._hand:
                head = self._hand[0]
                if head.tries >= self.max_tries:
                    parts = self._split(head.item)
                    if parts is None:
                        await self._give_up(head.item, self.failing or "failed")
                        self._hand.pop(0)
                        self._recovered()  # dealt with: a quiet topic must not stay "failing"
                    else:
                        self._hand[:1] = [_InHand(p) for p in parts]
                        self._delay = RETRY_FIRST_S  # each part gets the same bounded tries
                    continue
                await self._handle(head.item)
                self._hand.pop(0)
                self._recovered()

    async def _failed(self, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        transient = self.transient(exc)
        if self._hand and not transient:
            self._hand[0].tries += 1  # only a non-transient failure counts towards giving up
        if reason != self.failing:
            log.error("%s: %s (%s); restarting in %.2fs, %d item(s) in hand kept", self.name, reason,
                      "waiting it out" if transient else "counted towards dead-lettering the item",
                      self._delay, len(self._hand), exc_info=not transient)
        self.failing = reason
        self.restarts += 1
        if self.on_restart is not None:
            self.on_restart(self.name, exc)
        await asyncio.sleep(self._delay)
        self._delay = min(RETRY_MAX_S, self._delay * 2)

    def _recovered(self) -> None:
        if self.failing is not None:
            log.info("%s: working again after %d restart(s)", self.name, self.restarts)
            self.failing = None
            self._delay = RETRY_FIRST_S

    async def _fill(self) -> None:
        raise NotImplementedError

    async def _handle(self, item: Any) -> None:
        raise NotImplementedError

    def _split(self, item: Any) -> list[Any] | None:
        return None

    async def _give_up(self, item: Any, reason: str) -> None:
        raise NotImplementedError

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


@dataclass
class _Answered:
    job: Job
    result: Any


@dataclass
class _Flight:
    """One session call for a group of one model's jobs, started in the model's thread."""

    jobs: list[Job]
    future: asyncio.Future


class MicroBatcher(_QueueWorker):
    """Batches jobs for one model name; ``on_result(job, forecast_or_error)`` gets each in order,
    ``on_session(jobs)`` is told of each session call (metrics). A job whose ``on_result`` keeps
    failing is handed to ``give_up(job, reason)`` (a dead letter).

    A batch starts in the model's threads the moment it is full (in ``submit``, while the caller
    goes on cutting windows for the rest of a delivery), or ``max_wait_s`` after its first job.
    Several calls may be in flight at once: up to ``calls`` run side by side, each in its own
    thread (the model must allow concurrent calls, as an onnxruntime session does), the rest wait
    their turn; answers are handed on in the order the calls started, which is the jobs' order."""

    def __init__(
        self,
        name: str,
        on_result: OnResult,
        max_batch: int = 256,
        max_wait_s: float = 0.002,
        *,
        on_session: OnSession | None = None,
        give_up: GiveUp | None = None,
        transient: Transient | None = None,
        max_tries: int = MAX_TRIES,
        on_restart: OnRestart | None = None,
        run: RunBatch | None = None,
        calls: int = 1,
    ) -> None:
        self.name = name
        self.on_result = on_result
        self.run_batch = run or _predict  # one session call for a group of jobs of one model
        self.on_session = on_session
        self.give_up = give_up
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._executor = ThreadPoolExecutor(max_workers=calls, thread_name_prefix=f"model-{name}")
        self._open: list[Job] = []  # submitted, not started yet
        self._timer: asyncio.TimerHandle | None = None
        # Started, in start order; the head is handed on first. A flight is dropped only once its
        # answers are in hand: a restart awaits the same future again, never runs a session twice.
        self._flights: deque[_Flight] = deque()
        self._flying = 0  # jobs in ``_flights``
        self._launched = asyncio.Event()  # set when a flight starts (the worker may be waiting for one)
        self._init_worker(transient, max_tries, on_restart)

    @property
    def pending(self) -> int:
        return len(self._open) + self._flying + len(self._hand)

    def submit(self, job: Job) -> None:
        self._open.append(job)
        if len(self._open) >= self.max_batch:
            self._launch()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.max_wait_s, self._launch)

    def _launch(self) -> None:
        """Start the open jobs' session call(s) in the model's thread: one per run of jobs naming
        the same model object (a hot reload between two candles gives a batch two versions, run apart)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._open = self._open, []
        if not batch:
            return
        loop = asyncio.get_running_loop()
        start = 0
        while start < len(batch):
            end = start
            while end < len(batch) and batch[end].model is batch[start].model:
                end += 1
            group = batch[start:end]
            self._flights.append(_Flight(group, loop.run_in_executor(self._executor, self.run_batch, group)))
            self._flying += len(group)
            start = end
        self._launched.set()

    async def _fill(self) -> None:
        while not self._flights:
            self._launched.clear()
            await self._launched.wait()
        flight = self._flights[0]
        try:
            results = await asyncio.shield(flight.future)
        except asyncio.CancelledError:
            if not flight.future.cancelled():
                raise  # this worker is being stopped; the flight stays for a restart
            results = [RuntimeError("session call cancelled")] * len(flight.jobs)
        except Exception as exc:  # noqa: BLE001 - the thread itself failed: every job gets the error (dead letters)
            results = [exc] * len(flight.jobs)
        self._flights.popleft()
        self._flying -= len(flight.jobs)
        if self.on_session is not None:
            self.on_session(flight.jobs)
        self._hand = [_InHand(_Answered(j, r)) for j, r in zip(flight.jobs, results)]

    async def _handle(self, item: _Answered) -> None:
        await self.on_result(item.job, item.result)

    async def _give_up(self, item: _Answered, reason: str) -> None:
        if self.give_up is None:
            log.error("%s: dropped %s %s %d after %d tries: %s", self.name, item.job.symbol, item.job.interval,
                      item.job.open_time, self.max_tries, reason)
            return
        await self.give_up(item.job, reason)

    async def stop(self) -> None:
        await super().stop()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for flight in self._flights:
            flight.future.cancel()
        self._flights.clear()
        self._open, self._flying = [], 0
        self._executor.shutdown(wait=False, cancel_futures=True)


def _timed(jobs: Sequence[Job], call: Callable[[], Any]) -> list[Any]:
    """``call()``'s answers, one per job, each job's meta noting the session time and batch size;
    the error for every job when the call fails (reported per job by the caller: dead letter +
    metric)."""
    t0 = time.perf_counter()
    try:
        out = call()
    except Exception as exc:  # noqa: BLE001 - see above
        return [exc] * len(jobs)
    elapsed = time.perf_counter() - t0
    for j in jobs:
        j.meta["session_s"] = elapsed
        j.meta["batch"] = len(jobs)
    return list(out)


def _predict(jobs: Sequence[Job]) -> list[Any]:
    """Runs in the model's thread: one session call for the group, or the error for every job."""
    def call() -> Any:
        windows = np.stack([j.window for j in jobs])
        closes = np.asarray([j.last_close for j in jobs], dtype=np.float64)
        return jobs[0].model.predict(windows, closes)

    return _timed(jobs, call)


def predict_charts(jobs: Sequence[Job]) -> list[Any]:
    """Runs in the model's thread: chart jobs (``window`` the PNG bytes, ``meta["candle"]`` the
    chart's last candle, ``meta["where"]`` its uri) through one ``ChartModel.predict_many`` call;
    per job its ``ChartForecast`` or its error."""
    return _timed(jobs, lambda: jobs[0].model.predict_many(
        [(j.window, j.meta["candle"], j.meta.get("where", "chart")) for j in jobs]))


class ChartBatcher(MicroBatcher):
    """The micro-batcher for one chart classifier name: ``await answer(jobs)`` submits chart jobs
    (see ``predict_charts``) and returns, in their order, each one's ``ChartForecast`` or error.
    Jobs from every caller that arrive within ``max_wait_s`` (up to ``max_batch``) share one
    session call in the model's own thread, so concurrent deliveries batch together and a big
    delivery is cut into bounded calls."""

    def __init__(self, name: str, max_batch: int = 32, max_wait_s: float = 0.002, *,
                 on_session: OnSession | None = None, on_restart: OnRestart | None = None) -> None:
        super().__init__(name, self._resolve, max_batch, max_wait_s, on_session=on_session, on_restart=on_restart,
                         run=predict_charts)
        self._waiting: set[asyncio.Future] = set()

    @staticmethod
    async def _resolve(job: Job, result: Any) -> None:
        future = job.meta.pop("future", None)
        if future is not None and not future.done():
            future.set_result(result)

    async def answer(self, jobs: Sequence[Job]) -> list[Any]:
        loop = asyncio.get_running_loop()
        futures = []
        for job in jobs:
            job.meta["future"] = future = loop.create_future()
            futures.append(future)
            self._waiting.add(future)
            future.add_done_callback(self._waiting.discard)
            self.submit(job)
        self.start()
        return list(await asyncio.gather(*futures))

    async def stop(self) -> None:
        await super().stop()
        for future in list(self._waiting):  # a caller waiting on a stopped batcher is cancelled, not left hanging
            future.cancel()


@dataclass
class _Chunk:
    events: list[Any]
    key: tuple[str, ...]


class Outbox(_QueueWorker):
    """Publishes events in order through ``publish(events, *key)`` (e.g. ``OncePerCandle.publish_many``),
    batching consecutive events of one key. A transient failure is waited out; a chunk that keeps
    failing otherwise is tried one event at a time, and the event that still fails is handed to
    ``give_up(event, reason)`` (a dead letter) so the events behind it flow."""

    def __init__(
        self,
        name: str,
        publish: Callable[..., Awaitable[Any]],
        max_batch: int = 500,
        *,
        give_up: GiveUp | None = None,
        transient: Transient | None = None,
        max_tries: int = MAX_TRIES,
        on_restart: OnRestart | None = None,
    ) -> None:
        self.name = name
        self.publish = publish
        self.give_up = give_up
        self.max_batch = max_batch
        self._queue: asyncio.Queue[tuple[Any, tuple[str, ...]]] = asyncio.Queue()
        self._init_worker(transient, max_tries, on_restart)

    def put(self, event: Any, *key: str) -> None:
        self._queue.put_nowait((event, key))

    async def _fill(self) -> None:
        items = [await self._queue.get()]
        while len(items) < self.max_batch and not self._queue.empty():
            items.append(self._queue.get_nowait())
        chunks: list[_InHand] = []
        for event, key in items:
            if chunks and chunks[-1].item.key == key:
                chunks[-1].item.events.append(event)
            else:
                chunks.append(_InHand(_Chunk([event], key)))
        self._hand = chunks

    async def _handle(self, item: _Chunk) -> None:
        await self.publish(item.events, *item.key)

    def _split(self, item: _Chunk) -> list[Any] | None:
        if len(item.events) == 1:
            return None
        return [_Chunk([e], item.key) for e in item.events]

    async def _give_up(self, item: _Chunk, reason: str) -> None:
        (event,) = item.events
        if self.give_up is None:
            log.error("%s: dropped an event after %d tries: %s", self.name, self.max_tries, reason)
            return
        await self.give_up(event, reason)
