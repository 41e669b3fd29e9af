"""Trainer service: datasets.v1 build requests -> dataset, training, evaluation, ONNX package -> models.v1.

A competing consumer: replicas share the requests, each runs one job at a time (one device each),
in a worker thread so health, metrics and the lease below keep running. A job holds its entry
pending until its model is published; while it runs, the entry is re-claimed by its own consumer
every third of ``reclaim_idle_ms`` so no other replica takes a live job over, while a job whose
replica died is reclaimed and run again. A finished job's ``models.v1`` event is remembered under
its request id, so a re-delivered request republishes that event instead of training twice.
Progress goes to ``klinebus:{datasets.v1}:progress:<request_id>`` (``klinebus train-status``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
import time

from libs.common import topics
from libs.common.bus import redis_client
from libs.common.contracts import DatasetBuildRequest, ModelPublished
from libs.common.service import ServiceRuntime
from libs.common.signing import ControlGuard, Keyring
from services.trainer.loop import JobInterrupted
from services.trainer.requests import ImpossibleRequest, run_request
from services.trainer.settings import TrainerSettings

SETTINGS = TrainerSettings
log = logging.getLogger("klinebus.trainer")
# Finished jobs and progress are kept this long (a re-delivery after that trains again).
JOB_TTL_S = 30 * 24 * 3600
PROGRESS_EVERY_S = 1.0


def job_key(request_id: str) -> str:
    return topics.stream_companion_key(topics.DATASETS, f"done:{request_id}")


def progress_key(request_id: str) -> str:
    return topics.stream_companion_key(topics.DATASETS, f"progress:{request_id}")


def create(settings: TrainerSettings, url: str) -> ServiceRuntime:
    runtime = ServiceRuntime("trainer", settings, url, description="Builds datasets, trains, evaluates and publishes models.")
    bus, metrics = runtime.bus, runtime.metrics
    bus.publisher(topics.MODELS, ModelPublished)
    jobs = metrics.counter("jobs_total", "Training jobs by outcome", ["kind", "outcome"])
    job_seconds = metrics.histogram("job_seconds", "Wall time of a finished job", ["kind"],
                                    buckets=(10, 30, 60, 300, 900, 1800, 3600, 7200, 14400, 43200))
    running = metrics.gauge("jobs_running", "Jobs running now (0 or 1 per replica)")
    control = ControlGuard(Keyring.parse(settings.control_keys), metrics, bus.dead_letter)  # datasets.v1 in, models.v1 out

    @runtime.on_startup
    async def say_if_unsigned() -> None:
        control.warn_unconfigured("trainer", [topics.DATASETS])  # one line at start when there is no key
    stop = threading.Event()
    state: dict = {}
    # One job thread per replica; shutdown waits for it, so a stopped service has really stopped
    # (a job thread left running could still publish after its replacement started).
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainer-job")

    def client():
        if "client" not in state:
            state["client"] = redis_client(runtime.url)
        return state["client"]

    async def keep_claimed() -> None:
        """Reset the idle time of this consumer's pending datasets.v1 entries (the running job's)."""
        stream = topics.stream_key(topics.DATASETS)
        while True:
            await asyncio.sleep(max(settings.reclaim_idle_ms / 3000, 0.05))
            try:
                pending = await client().xpending_range(stream, bus.service, "-", "+", 10, consumername=bus.consumer)
                ids = [p["message_id"] for p in pending]
                if ids:
                    await client().xclaim(stream, bus.service, bus.consumer, 0, ids, justid=True)
            except Exception as exc:  # noqa: BLE001 - the next beat tries again
                log.warning("trainer: renewing the job lease failed: %s", exc)

    @bus.competing(topics.DATASETS, description="Build the dataset, train, evaluate and publish a model.", max_records=1)
    async def on_request(req: DatasetBuildRequest) -> None:
        metrics.events_in.labels(topics.DATASETS).inc()
        if not await control.admit(topics.DATASETS, req):
            return
        done = await client().get(job_key(req.request_id))
        if done is not None:  # finished before a crash took the acknowledgement: say it again, train nothing
            await bus.publish(control.sign(topics.MODELS, ModelPublished.model_validate_json(done)))
            jobs.labels(req.model_kind, "republished").inc()
            return
        loop = asyncio.get_running_loop()
        last = {"t": 0.0}

        def progress(stage: str, info: dict) -> None:
            if stop.is_set():  # the service is stopping; its loop and client may be gone
                return
            now = time.monotonic()
            if stage == "batch" and now - last["t"] < PROGRESS_EVERY_S:
                return
            last["t"] = now
            fields = {"stage": stage, "info": json.dumps(info, default=str), "updated_ms": str(int(time.time() * 1000)),
                      "consumer": bus.consumer, "kind": req.model_kind}
            asyncio.run_coroutine_threadsafe(_set_progress(req.request_id, fields), loop)

        async def _set_progress(request_id: str, fields: dict) -> None:
            try:
                await client().hset(progress_key(request_id), mapping=fields)
                await client().expire(progress_key(request_id), JOB_TTL_S)
            except Exception as exc:  # noqa: BLE001 - progress is best effort
                log.debug("progress write failed: %s", exc)

        lease = asyncio.create_task(keep_claimed())
        started = time.monotonic()
        running.set(1)
        log.info("trainer: job %s (%s %s %s) started", req.request_id, req.model_kind, req.symbols, req.intervals)
        try:
            result = await loop.run_in_executor(worker, run_request, req, settings, progress, stop.is_set)
        except ImpossibleRequest as exc:
            jobs.labels(req.model_kind, "impossible").inc()
            log.warning("trainer: request %s refused: %s", req.request_id, exc)
            await _set_progress(req.request_id, {"stage": "refused", "info": json.dumps({"reason": str(exc)})})
            await bus.dead_letter(topics.DATASETS, req.model_dump(mode="json"), f"dataset request {req.request_id}: {exc}")
            return
        except (asyncio.CancelledError, JobInterrupted):
            stop.set()  # the worker thread stops at its next batch; the entry stays pending for a restart
            raise
        finally:
            lease.cancel()
            running.set(0)
        event = control.sign(topics.MODELS, result.event())
        await client().set(job_key(req.request_id), event.model_dump_json(), ex=JOB_TTL_S)
        await bus.publish(event)
        await _set_progress(req.request_id, {"stage": "published", "info": json.dumps(
            {"uri": event.uri, "version": event.version, "promoted": event.promoted})})
        jobs.labels(req.model_kind, "published").inc()
        job_seconds.labels(req.model_kind).observe(time.monotonic() - started)
        log.info("trainer: job %s published %s v%s (%s): %s", req.request_id, event.model, event.version,
                 "promoted" if event.promoted else "not promoted", event.uri)

    @runtime.on_shutdown
    async def close() -> None:
        stop.set()
        # The job thread sees the stop at its next batch, or before publishing.
        await asyncio.to_thread(worker.shutdown, True)
        if "client" in state:
            await state["client"].aclose()

    return runtime
