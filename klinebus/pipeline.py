"""Start several services in one process against one Redis: the demo and the integration tests.

Each service still gets its own broker, consumer group, state and telemetry
port, exactly as when it runs alone under ``klinebus run``.
"""

from __future__ import annotations

import asyncio
import io
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from klinebus.cli import app_module
from libs.common.service import ServiceRuntime


def build_runtime(
    name: str, url: str, data_dir: Path, consumer: str = "local", **overrides: Any
) -> ServiceRuntime:
    module = app_module(name)
    settings = module.SETTINGS(data_dir=data_dir, redis_url=url, consumer_name=consumer, **overrides)
    return module.create(settings, url)


async def start_runtimes(
    names: Sequence[str],
    url: str,
    data_dir: Path,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    consumer: str = "local",
    http: bool = True,
) -> list[ServiceRuntime]:
    """Start ``names`` in order (consumers before producers, so nothing waits on a group)."""
    runtimes: list[ServiceRuntime] = []
    try:
        for name in names:
            runtime = build_runtime(name, url, data_dir, consumer, **dict((overrides or {}).get(name, {})))
            await runtime.start(http=http)
            runtimes.append(runtime)
    except BaseException:
        await stop_runtimes(runtimes)
        raise
    return runtimes


log = logging.getLogger("klinebus.pipeline")

# A service that has not stopped after this long is reported with the stack of every task and left
# behind, so one stuck part cannot keep the demo (or a test) from ending.
STOP_DEADLINE_S = 60.0


async def stop_runtimes(runtimes: Sequence[ServiceRuntime], deadline_s: float = STOP_DEADLINE_S) -> None:
    for runtime in reversed(runtimes):
        try:
            await asyncio.wait_for(runtime.stop(), deadline_s)
        except asyncio.TimeoutError:
            log.error("%s did not stop within %.0fs; its tasks:\n%s", runtime.name, deadline_s, _task_stacks())


def _task_stacks() -> str:
    out = io.StringIO()
    for task in asyncio.all_tasks():
        task.print_stack(file=out)
    return out.getvalue()
