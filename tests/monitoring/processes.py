"""Real Prometheus and Alertmanager processes on loopback (Debian's packages: scripts/system-deps.sh
installs them). Tests that need one skip with the missing binary's name when it is absent."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import orjson
import pytest
import yaml

from libs.common.redis_server import _die_with_parent

READY_TIMEOUT_S = 60.0


def binary(*names: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip(f"{' or '.join(names)} not on PATH (run scripts/system-deps.sh)")
    raise AssertionError  # unreachable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return orjson.loads(r.read())


def post_json(url: str, doc) -> int:
    req = urllib.request.Request(url, data=orjson.dumps(doc), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.status


def _wait_ready(proc: subprocess.Popen, url: str, log: Path, what: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {log.read_text(errors='replace')[-800:]}")
        with contextlib.suppress(urllib.error.URLError, ConnectionError, OSError):
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready in {READY_TIMEOUT_S:.0f}s: {log.read_text(errors='replace')[-800:]}")


@contextlib.contextmanager
def _process(argv: list[str], log: Path, ready_url: str, what: str) -> Iterator[subprocess.Popen]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent)  # noqa: PLW1509 - dies with the test process
    try:
        _wait_ready(proc, ready_url, log, what)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def alertmanager(folder: Path, webhook_url: str) -> Iterator[str]:
    """A real Alertmanager routing every alert to ``webhook_url`` at once (no grouping delay) and
    telling it of resolves; yields its base URL."""
    exe = binary("prometheus-alertmanager", "alertmanager")
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "route": {"receiver": "hook", "group_by": ["..."], "group_wait": "0s", "group_interval": "1s",
                  "repeat_interval": "1h"},
        "receivers": [{"name": "hook", "webhook_configs": [{"url": webhook_url, "send_resolved": True}]}],
    }
    (folder / "alertmanager.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    argv = [exe, f"--config.file={folder / 'alertmanager.yml'}", f"--storage.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=", "--log.level=warn"]
    with _process(argv, folder / "alertmanager.log", f"{base}/-/ready", "alertmanager"):
        yield base


@contextlib.contextmanager
def prometheus(folder: Path, jobs: dict[str, list[str]], rule_files: list[Path] = (), alertmanager_url: str | None = None,
               interval: str = "1s") -> Iterator[str]:
    """A real Prometheus scraping ``jobs`` (name -> host:port targets) every ``interval``, evaluating
    ``rule_files`` as often and sending alerts to ``alertmanager_url``; yields its base URL."""
    exe = binary("prometheus")
    folder.mkdir(parents=True, exist_ok=True)
    config: dict = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]} for job, targets in jobs.items()],
    }
    if alertmanager_url:
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager_url.split("://")[1]]}]}]}
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    argv = [exe, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    with _process(argv, folder / "prometheus.log", f"{base}/-/ready", "prometheus"):
        yield base


async def until(fn, what: str, timeout: float = 60.0):
    """Poll ``fn`` (blocking, run in a thread) until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await asyncio.to_thread(fn)
        if last:
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what} within {timeout:.0f}s (last: {last!r})")
