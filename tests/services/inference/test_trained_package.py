"""A BiLSTM trained by the trainer's code on real candles, served by `python -m services.inference`
as a real process on a real Redis, killed with SIGKILL mid-stream and started again: every candle
is answered once, in order, with what the package's graph says for the window the test builds."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from libs.common import topics
from tests.services.inference.models import feature_events
from tests.streams import add_events, read_topic

pytestmark = pytest.mark.slow

LOOKBACK = 10
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The trainer's BiLSTM (seed 002 shapes, lookback shortened to 10) after a few steps on real
    BTCUSDT 15m candles, exported to ONNX and published into a registry by the trainer's code."""
    from services.trainer.datasets import BuildSpec, build_dataset
    from services.trainer.jobs import TrainOptions, run_training
    from tests.candles import BTC_15M

    root = tmp_path_factory.mktemp("trained")
    build_dataset(BuildSpec(kind="bilstm-ohlc", inputs=[str(BTC_15M)], out=root / "ds", lookback=LOOKBACK))
    result = run_training(root / "ds", TrainOptions(registry=str(root / "reg"), epochs=1, max_batches=2, device="cpu"))
    return root / "reg", result.published


def start(url: str, data: Path, registry: Path) -> subprocess.Popen:
    env = {**os.environ, "KLINEBUS_REDIS_URL": url, "KLINEBUS_DATA_DIR": str(data), "KLINEBUS_MODEL_DIR": str(registry),
           "KLINEBUS_CONSUMER_NAME": "inference-0", "KLINEBUS_LOG_FORMAT": "text", "KLINEBUS_SERVE_UNPROMOTED": "true",
           "KLINEBUS_OWNER_LEASE_MS": "1500"}
    return subprocess.Popen([sys.executable, "-m", "services.inference"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


async def model_forecasts(url: str, name: str) -> list[dict]:
    return [e for e in await read_topic(url, topics.PREDICTIONS) if e["model"] == name]


async def wait_count(url: str, name: str, n: int, proc: subprocess.Popen, timeout: float = 120) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = await model_forecasts(url, name)
        if len(got) >= n:
            return got
        if proc.poll() is not None:
            raise AssertionError(f"the service exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name}: {len(got)} of {n} forecasts")


async def test_a_trained_package_survives_sigkill_without_loss_or_double(redis_url, tmp_path, trained):
    import onnxruntime as ort

    registry, published = trained
    meta = published.meta
    assert meta.feature_set == "bilstm-13-v1" and meta.lookback == LOOKBACK
    events = feature_events(160, feature_set=meta.feature_set)
    first_warm = next(i for i, e in enumerate(events) if e.warm)
    first = first_warm + LOOKBACK - 1
    proc = start(redis_url, tmp_path, registry)
    try:
        await add_events(redis_url, events[:60])
        before = len(await wait_count(redis_url, meta.name, 60 - first, proc))
        await add_events(redis_url, events[60:])
        await wait_count(redis_url, meta.name, before + 5, proc)
        proc.send_signal(signal.SIGKILL)  # mid-stream: some candles taken, some forecasts not yet published
        proc.wait(30)
        proc = start(redis_url, tmp_path, registry)
        got = await wait_count(redis_url, meta.name, len(events) - first, proc)
        await asyncio.sleep(0.5)
        got = await model_forecasts(redis_url, meta.name)
        persistence = await model_forecasts(redis_url, "persistence")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert [e["open_time"] for e in got] == [e.open_time for e in events[first:]]
    assert [e["open_time"] for e in persistence] == [e.open_time for e in events]
    # The reference: the graph the package says to serve (its int8 variant when the trainer left
    # one, docs/inference.md), run here on windows built here from the events.
    config = json.loads((Path(published.uri) / "klinebus.json").read_text())["config"]
    served = (config.get("fast_model") or {}).get("file", "model.onnx")
    sess = ort.InferenceSession(str(Path(published.uri) / served), providers=["CPUExecutionProvider"])
    windows = np.stack([[[events[j].values[f] for f in meta.features] for j in range(i - LOOKBACK + 1, i + 1)]
                        for i in range(first, len(events))])
    (want,) = sess.run(None, {meta.inputs[0].name: windows})
    # The int8 graph quantises each call's activations by that call's own range (dynamic
    # quantisation), so a forecast moves by ~1e-7 relative with the windows that share its batch;
    # the float graph is exact to 1e-9.
    rel = 1e-6 if served != "model.onnx" else 1e-9
    for e, row in zip(got, want[:, 0, :]):
        assert e["predicted"] == pytest.approx(dict(zip(meta.targets, row.tolist())), rel=rel)
        assert e["model_version"] == published.version
