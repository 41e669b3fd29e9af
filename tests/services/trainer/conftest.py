"""Shared fixtures for the trainer's tests: real shipped candles, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
TEST_KLINES = REPO / "tests" / "data" / "klines"
BTC_15M = TEST_KLINES / "BTCUSDT-15m-2023-04-01-head3000.csv.gz"
DOGE_15M = TEST_KLINES / "DOGEUSDT-15m-2023-04-01-head3000.csv.gz"
# Holds Binance's real 2021-04-20 (2 bars) and 2021-04-25 (3 bars) outages (tests/data/klines/README.md).
ETH_1H_GAPS = TEST_KLINES / "ETHUSDT-1h-2021-04-04-head3000.csv.gz"


@pytest.fixture(scope="session")
def bilstm_dataset(tmp_path_factory) -> Path:
    from services.trainer.datasets import BuildSpec, build_dataset

    out = tmp_path_factory.mktemp("ds") / "bilstm"
    build_dataset(BuildSpec(kind="bilstm-ohlc", inputs=[str(BTC_15M)], out=out))
    return out


@pytest.fixture(scope="session")
def trained_bilstm(bilstm_dataset, tmp_path_factory):
    """A BiLSTM trained for a few steps on real candles, exported and published (one per session)."""
    from services.trainer.jobs import TrainOptions, run_training

    registry = tmp_path_factory.mktemp("registry")
    result = run_training(bilstm_dataset, TrainOptions(registry=str(registry), epochs=2, max_batches=3, device="cpu"))
    return registry, result
