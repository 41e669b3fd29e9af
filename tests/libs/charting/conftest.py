from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from libs.common.klines import read_kline_frame
from libs.charting.indicators import window_from_frame
from libs.charting.presets import ANALYSIS
from libs.charting.window import ChartWindow

DATA = Path(__file__).resolve().parents[2] / "data" / "klines" / "charts-BTCUSDT-1m-2026-03-23-head300.csv.gz"
REFERENCE = Path(__file__).resolve().parent / "reference"

logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def frame():
    return read_kline_frame(DATA, "BTCUSDT", "1m")


@pytest.fixture(scope="session")
def full(frame) -> ChartWindow:
    """All 300 real candles with the analysis indicators from the features kernels."""
    return window_from_frame(frame, "BTCUSDT", "1m", ANALYSIS)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.float64)


def rms(a: bytes, b: bytes) -> float:
    pa, pb = pixels(a), pixels(b)
    assert pa.shape == pb.shape, (pa.shape, pb.shape)
    return float(np.sqrt(((pa - pb) ** 2).mean()))
