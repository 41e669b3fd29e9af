"""Real candles and a real tiny GGUF model for the advice experiment's tests."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[4]
# Real Binance spot 1m candles, OHLCV only (the trade-count column is empty): data/klines/README.md
BTC_1M = REPO / "data" / "klines" / "BTCUSDT-1m-2026-04-15_2026-04-16.csv.gz"
ETH_1M = REPO / "data" / "klines" / "ETHUSDT-1m-2026-04-15_2026-04-16.csv.gz"
# Real Binance USD-M futures 1m candles with all 12 columns, trade counts included: tests/data/klines/README.md
AVAX_1M = REPO / "tests" / "data" / "klines" / "AVAXUSDT-1m-2026-04-01-futures-um-head60.csv.gz"

# 2026-04-15 00:00 .. 06:00 for training, 06:00 .. 08:00 for verification: small enough for quick tests.
TRAIN_RANGE = "2026-04-15..2026-04-15T06:00"
VERIFY_RANGE = "2026-04-15T06:00..2026-04-15T08:00"


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from services.trainer.advice import dataset as D

    out = tmp_path_factory.mktemp("advice") / "ds"
    config = D.AdviceConfig(D.parse_range(TRAIN_RANGE), D.parse_range(VERIFY_RANGE))
    D.build([BTC_1M], out, config)
    return out


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory):
    """libs/llm's tiny random-weight Qwen2.5-VL-shaped GGUF pair."""
    from libs.llm.testing import write_tiny_qwen25vl

    return write_tiny_qwen25vl(tmp_path_factory.mktemp("tiny-gguf"))


@pytest.fixture(scope="session")
def tiny_gguf(tiny_pair) -> Path:
    """Its text model alone (the advice prompt has no image)."""
    return tiny_pair.model
