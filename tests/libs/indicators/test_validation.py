"""Impossible input gives one clear error naming the candle."""

from __future__ import annotations

import numpy as np
import pytest

from libs.common.klines import InvalidKline
from libs.indicators.batch import compute_batch
from libs.indicators.catalog import UnknownFeature
from libs.indicators.validation import InvalidCandles


def candles(n=50):
    c = np.linspace(100.0, 110.0, n)
    return [c.copy(), c + 1.0, c - 1.0, c.copy(), np.full(n, 5.0)]


@pytest.mark.parametrize(
    "field, value, match",
    [
        (3, np.nan, "NaN or infinite"),
        (4, np.inf, "NaN or infinite"),
        (0, 0.0, "zero or negative"),
        (2, -1.0, "zero or negative"),
        (1, 50.0, "high is below low"),
        (3, 200.0, "outside"),
        (4, -3.0, "volume is negative"),
    ],
)
def test_bad_candle_is_named(field, value, match):
    cols = candles()
    cols[field][17] = value
    with pytest.raises(InvalidCandles, match=match) as err:
        compute_batch(*cols)
    assert err.value.index == 17
    assert str(err.value).startswith("candle 17:") and "\n" not in str(err.value)
    assert isinstance(err.value, InvalidKline)  # the services' dead-letter path catches one type


def test_open_time_must_increase():
    ot = np.arange(50, dtype=np.int64) * 60_000
    ot[30] = ot[29]
    with pytest.raises(InvalidCandles, match="candle 30: open_time .* does not increase"):
        compute_batch(*candles(), open_time=ot)


def test_gap_is_an_error_unless_allowed():
    ot = np.arange(50, dtype=np.int64) * 60_000
    ot[40:] += 120_000
    with pytest.raises(InvalidCandles, match="candle 40: open_time jumps 180000 ms"):
        compute_batch(*candles(), open_time=ot, interval_ms=60_000)
    assert compute_batch(*candles(), open_time=ot, interval_ms=60_000, allow_gaps=True)["close"].shape == (50,)


def test_unequal_lengths_and_unknown_names():
    cols = candles()
    cols[4] = cols[4][:-1]
    with pytest.raises(InvalidCandles, match="equally long"):
        compute_batch(*cols)
    with pytest.raises(UnknownFeature, match="unknown feature"):
        compute_batch(*candles(), names=["sma_20", "sma_21"])
