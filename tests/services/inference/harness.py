"""The inference service built for a test on a real Redis, and the waits its tests share."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import REGISTRY

from services.inference import app
from services.inference.settings import InferenceSettings
from tests.services.inference.models import CONTROL_KEYS


def runtime(url: str, tmp_path, **kw):
    kw.setdefault("control_keys", CONTROL_KEYS)
    settings = InferenceSettings(data_dir=tmp_path, redis_url=url, consumer_name="t", model_dir=str(tmp_path / "reg"),
                                 max_wait_ms=1, **kw)
    return app.create(settings, url)


def metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(f"klinebus_inference_{name}", labels) or 0.0


async def poll(cond, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def until(cond, timeout: float = 60.0) -> None:
    """Wait until the plain predicate ``cond()`` holds (``poll`` for an awaitable one)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)

