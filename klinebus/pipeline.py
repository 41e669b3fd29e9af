"""Start several services in one process against one Redis: the demo and the integration tests.

Each service still gets its own broker, consumer group, state and telemetry
port, exactly as when it runs alone under ``klinebus run``.
"""

from __future__ import annotations

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


async def stop_runtimes(runtimes: Sequence[ServiceRuntime]) -> None:
    for runtime in reversed(runtimes):
        await runtime.stop()
