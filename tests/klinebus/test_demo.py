"""`klinebus demo` as a newcomer runs it: a real process, shipped candles, every stage, no network."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

CANDLES = 70  # > the trained model's 60-candle lookback, so it forecasts during the replay
SYMBOLS = ("BTCUSDT", "ETHUSDT")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_demo_runs_every_stage_on_shipped_candles(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KLINEBUS_")}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "klinebus", "demo", "--plain", "--candles", str(CANDLES), "--symbols", ",".join(SYMBOLS),
         "--train-epochs", "1", "--data-dir", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,  # expiry raises with what it printed
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    done = re.search(r"done: (\d+) closed candles -> (\d+) persistence and (\d+) trained-model forecasts", proc.stdout)
    assert done, proc.stdout[-3000:]
    klines, persistence, model = map(int, done.groups())
    assert klines == persistence == CANDLES * len(SYMBOLS)
    # The first forecast needs a full lookback of live features; then one per candle per symbol.
    assert model > 0
    # The trained model really went through the trainer into the registry, with its scorecard.
    meta = json.loads((tmp_path / "models" / "lstm-close-unified-1m" / "1" / "klinebus.json").read_text())
    assert {"persistence"} <= set(meta["baseline_metrics"])
    assert (tmp_path / "models" / "vlm").is_dir()
    assert sorted(p.name for p in (tmp_path / "archive").iterdir()) == sorted(SYMBOLS)
