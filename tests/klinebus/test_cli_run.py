"""`klinebus run <service>` as an operator runs it: embedded Redis, telemetry, clean SIGTERM."""

import json

import pytest
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_run_serves_health_ready_and_metrics_and_stops_cleanly(tmp_path: Path):
    port = _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KLINEBUS_")},
        "KLINEBUS_REDIS_URL": "embedded",  # asked for: an unset URL is an error (tests/deploy/test_redis_url.py)
        "KLINEBUS_DATA_DIR": str(tmp_path),
        "KLINEBUS_HTTP_PORT": str(port),
        "KLINEBUS_HTTP_HOST": "127.0.0.1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.inference"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline:
            try:
                status, body = _get(f"http://127.0.0.1:{port}/readyz")
                if status == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.2)
        assert status == 200, "never became ready"
        # the bus and the persistence model, each supervised worker (the persistence model's
        # batcher and the three outboxes: predictions, scores, alerts), and no partition still restoring
        assert json.loads(body)["checks"] == {
            "broker": True, "bus": True, "model": True, "partitions": True, "batcher:persistence": True,
            "outbox:predictions": True, "outbox:scores": True, "outbox:alerts": True,
        }
        assert _get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        code, metrics = _get(f"http://127.0.0.1:{port}/metrics")
        assert code == 200 and b"klinebus_inference_dead_letters_total" in metrics
        redis_pid = int((tmp_path / "redis" / "redis.pid").read_text())
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    # JSON logs, one object per line.
    logs = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert any(entry["msg"].startswith("inference started") for entry in logs)
    assert (tmp_path / "models" / "persistence" / "1" / "model.onnx").exists()
    time.sleep(0.2)
    assert not Path(f"/proc/{redis_pid}").exists() or "zombie" in Path(f"/proc/{redis_pid}/status").read_text().lower()


def test_tail_prints_the_last_events_of_a_topic(redis_url, capsys):
    import redis as redis_sync

    from libs.common import topics
    from klinebus.cli import main
    from libs.common.contracts import DeadLetter

    client = redis_sync.Redis.from_url(redis_url)
    for i in range(3):
        client.xadd(topics.stream_key(topics.DEAD_LETTERS), {"__data__": DeadLetter(
            source="klines.v1", service="features", reason=f"r{i}", payload="x").to_json()})
    client.close()
    assert main(["tail", "dead-letters.v1", "-n", "2", "--redis-url", redis_url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line.split(" ", 1)[1])["reason"] for line in lines] == ["r1", "r2"]
    assert main(["tail", "nope.v1", "--redis-url", redis_url]) == 2
    assert "unknown topic 'nope.v1'" in capsys.readouterr().err


def test_a_dead_background_task_fails_healthz_and_the_run(tmp_path, redis_url):
    import asyncio

    from klinebus.pipeline import build_runtime
    from libs.common.service import ServiceFailed

    async def scenario():
        runtime = build_runtime("inference", redis_url, tmp_path)

        @runtime.background
        async def doomed() -> None:
            raise RuntimeError("websocket library exploded")

        runner = asyncio.create_task(runtime.run_forever())
        for _ in range(200):
            if runtime.health.fatal:
                break
            await asyncio.sleep(0.02)
        assert runtime.health.fatal == "background task doomed failed: RuntimeError: websocket library exploded"
        try:
            await asyncio.wait_for(runner, 10)
        except ServiceFailed as exc:
            return str(exc)
        return None

    assert asyncio.run(scenario()) == "inference: background task doomed failed: RuntimeError: websocket library exploded"


def test_an_image_without_another_services_extra_still_runs_its_own(monkeypatch):
    """Per-service images: importing the CLI must not need numba (features) when only ingest is installed."""
    import builtins

    from klinebus import cli

    real_import = builtins.__import__

    def no_numba(name, *args, **kwargs):
        if name == "numba" or name.startswith("numba."):
            raise ModuleNotFoundError("No module named 'numba'", name="numba")
        return real_import(name, *args, **kwargs)

    for mod in [m for m in list(sys.modules) if m.startswith(("services.features", "libs.indicators", "numba"))]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setattr(builtins, "__import__", no_numba)
    parser = cli.build_parser()
    args = parser.parse_args(["run", "ingest"])
    assert args.service == "ingest"
    with pytest.raises(SystemExit):
        parser.parse_args(["features", "compute"])  # that subcommand is simply absent here
