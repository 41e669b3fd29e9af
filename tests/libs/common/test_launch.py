"""A service process freezes its start-up heap and collects young objects less often (libs/common/launch.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from libs.common.launch import GC_YOUNG_THRESHOLD

REPO = Path(__file__).resolve().parents[3]

PROBE = """
import gc, types
from libs.common import launch
from libs.common.settings import ServiceSettings

before = (gc.get_freeze_count(), gc.get_threshold()[0])
seen = {}

class Runtime:
    async def run_forever(self, on_started=None):
        seen["starting"] = gc.get_freeze_count()
        on_started()  # where ServiceRuntime.run_forever calls it: once the service has started
        seen["during"] = (gc.get_freeze_count(), gc.get_threshold()[0])

launch.run_app(types.SimpleNamespace(SETTINGS=ServiceSettings, create=lambda settings, url: Runtime()))
print(*before, seen["starting"], *seen["during"])
"""


def test_run_app_freezes_the_start_up_heap_once_the_service_has_started(redis_url, tmp_path):
    env = {**os.environ, "KLINEBUS_REDIS_URL": redis_url, "KLINEBUS_DATA_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    frozen_before, threshold_before, frozen_starting, frozen_during, threshold_during = map(int, out.stdout.split())
    assert frozen_before == 0 and threshold_before == 700  # Python's defaults, before the service starts
    assert frozen_starting == 0  # not before start: what start-up builds is frozen too
    assert frozen_during > 10_000  # modules, classes and schemas imported by then
    assert threshold_during == GC_YOUNG_THRESHOLD
