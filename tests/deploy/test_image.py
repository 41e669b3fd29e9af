"""A real service image, built from the Dockerfile and started as a platform would start it.

buildah (Debian's, `--storage-driver vfs --isolation chroot`, RUN steps included) builds the
`features` image on an offline Debian bookworm + python3 base (scripts/images.py: debootstrap from
the mirror apt uses, cached under /var/cache/klinebus-ci), then `klinebus run features` runs from
the image (`buildah run`: the image's user, environment and file set) against a real Redis on
loopback; the test waits for /readyz, sends real candles to klines.v1 and reads their features
from features.v1, runs the image's HEALTHCHECK command inside it, and stops it with SIGTERM.

Cold (no base, no layers) this is a few minutes; warm (cached base and dependency layers) the build
takes seconds. Needs root and buildah (scripts/system-deps.sh installs it); otherwise it skips.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from libs.common.contracts import KlineEvent
from libs.common.klines import read_kline_csv
from tests.streams import add_events, read_topic, wait_for_events

REPO = Path(__file__).resolve().parents[2]
CANDLES = REPO / "data" / "klines" / "BTCUSDT-1m-2026-04-15_2026-04-16.csv.gz"
READY_DEADLINE_S = 300  # numba compiles the indicator kernels at start; 2 shared cores are slow

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def _images():
    spec = importlib.util.spec_from_file_location("klinebus_images", REPO / "scripts" / "images.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


images = _images()


@pytest.fixture(scope="module")
def image() -> str:
    why = images.missing_tools()
    if why:
        pytest.skip(f"no image build here: {why}")
    return images.build("features")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _buildah(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(images.buildah_cmd() + list(args), capture_output=True, text=True, **kw)


def _config(image: str) -> dict:
    out = _buildah("inspect", "--type", "image", image, check=True).stdout
    return json.loads(out)


def test_the_image_is_layered_non_root_and_checks_its_health(image):
    info = _config(image)
    docker = info["Docker"]["config"]
    assert docker["User"] == "10001:10001"
    assert docker["Entrypoint"] == ["klinebus"]
    assert "KLINEBUS_HTTP_PORT=9000" in docker["Env"] and "HOME=/home/klinebus" in docker["Env"]
    health = docker["Healthcheck"]["Test"]
    assert health[0] == "CMD" and "/healthz" in " ".join(health)
    # no compiler in the runtime image: the builder stage kept them
    ctr = _buildah("from", image, check=True).stdout.strip()
    try:
        probe = _buildah("run", "--isolation", "chroot", ctr, "--", "sh", "-c",
                         "id -u; touch \"$HOME/.probe\" && echo home-writable; command -v gcc || echo no-gcc; "
                         "touch /app/x 2>/dev/null || echo code-read-only; ls -A /app")
        assert probe.returncode == 0, probe.stderr
        out = probe.stdout.split()
        assert out[:4] == ["10001", "home-writable", "no-gcc", "code-read-only"], probe.stdout
        # the build context was the .dockerignore allow-list: no .venv, var/, tests/ or .git
        assert set(out[4:]) == {"README.md", "data", "klinebus", "libs", "pyproject.toml",
                                "scripts", "services"}, out[4:]
    finally:
        _buildah("rm", ctr)


def test_klinebus_run_features_from_the_image_turns_candles_into_features(image, redis_url, tmp_path):
    port = _free_port()
    candles = read_kline_csv(CANDLES, "BTCUSDT", "1m")[:5]
    ctr = _buildah("from", image, check=True).stdout.strip()
    env = {
        "KLINEBUS_REDIS_URL": redis_url, "KLINEBUS_HTTP_PORT": str(port), "KLINEBUS_HTTP_HOST": "127.0.0.1",
        "KLINEBUS_CONSUMER_NAME": "image-test", "KLINEBUS_WARMUP_SOURCE": "none", "KLINEBUS_LOG_FORMAT": "json",
    }
    cmd = images.buildah_cmd() + ["run", "--isolation", "chroot", "--network", "host"]
    for k, v in env.items():
        cmd += ["--env", f"{k}={v}"]
    log = (tmp_path / "service.log").open("w+")
    proc = subprocess.Popen(cmd + [ctr, "--", "klinebus", "run", "features"], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + READY_DEADLINE_S
        status, body = 0, b""
        while time.monotonic() < deadline:
            try:
                status, body = _get(f"http://127.0.0.1:{port}/readyz")
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                status = 0
            if status == 200:
                break
            assert proc.poll() is None, f"exited {proc.returncode}: {_tail(log)}"
            time.sleep(0.5)
        assert status == 200, f"not ready after {READY_DEADLINE_S}s: {_tail(log)}"

        # the image's HEALTHCHECK, run inside the container while the service runs
        health = _config(image)["Docker"]["config"]["Healthcheck"]["Test"][1:]
        check = _buildah("run", "--isolation", "chroot", "--network", "host", "--env", f"KLINEBUS_HTTP_PORT={port}",
                         ctr, "--", *health, timeout=60)
        assert check.returncode == 0, check.stderr

        asyncio.run(add_events(redis_url, [KlineEvent.from_kline(k, "replay") for k in candles]))
        features = asyncio.run(wait_for_events(redis_url, "features.v1", len(candles), timeout=120))
        assert [(f["symbol"], f["interval"], f["open_time"]) for f in features] == [
            ("BTCUSDT", "1m", k.open_time) for k in candles]
        assert asyncio.run(read_topic(redis_url, "dead-letters.v1")) == []
    finally:
        _stop(proc)
        _buildah("rm", ctr)
    logs = [json.loads(line) for line in _tail(log, 200_000).splitlines() if line.startswith("{")]
    assert any(e["msg"].startswith("features started") for e in logs), _tail(log)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _tail(log, n: int = 3000) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-n:]
