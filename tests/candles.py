"""Real candles for indicator, features and trainer tests (tests/data/klines/README.md names their sources)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

KLINES = Path(__file__).resolve().parent / "data" / "klines"
BTC_15M = KLINES / "BTCUSDT-15m-2023-04-01-head3000.csv.gz"
ETH_1H_GAPS = KLINES / "ETHUSDT-1h-2021-04-04-head3000.csv.gz"
DOGE_15M = KLINES / "DOGEUSDT-15m-2023-04-01-head3000.csv.gz"


@dataclass(frozen=True)
class Candles:
    name: str
    open_time: np.ndarray
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray

    @property
    def ohlcv(self) -> tuple[np.ndarray, ...]:
        return self.open, self.high, self.low, self.close, self.volume


def load(path: Path) -> Candles:
    df = pd.read_csv(path)
    return Candles(
        path.name,
        df["open_time"].to_numpy(np.int64),
        *(df[c].to_numpy(np.float64) for c in ("open", "high", "low", "close", "volume")),
    )
