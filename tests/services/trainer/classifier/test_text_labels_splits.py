"""The seed's candle text, the classes from the next candle's move, and time splits with an embargo."""

from __future__ import annotations

import numpy as np
import pytest

from services.trainer.classifier.labels import (
    BEARISH,
    BULLISH,
    NEUTRAL,
    classify_moves,
    neutral_band,
    return_scale,
    scale_target,
    unscale_target,
)
from services.trainer.classifier.splits import time_splits
from services.trainer.classifier.text import candle_text


def test_text_is_the_seeds_for_a_btc_candle():
    # The first row of seed 001's example index.
    assert candle_text(45230.50, 45876.20, 44892.10, 45654.30, 1234567) == (
        "Open: 45230.50, High: 45876.20, Low: 44892.10, Close: 45654.30, Volume: 1234567"
    )


def test_text_keeps_five_significant_digits_of_a_low_price():
    assert candle_text(0.081234, 0.0823, 0.0801, 0.08111, 123456789.4) == (
        "Open: 0.081234, High: 0.082300, Low: 0.080100, Close: 0.081110, Volume: 123456789"
    )
    assert candle_text(1850.234, 1851, 1849.5, 1850, 10.6).startswith("Open: 1850.23, High: 1851.00")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_text_refuses_impossible_numbers(bad):
    with pytest.raises(ValueError, match="finite"):
        candle_text(bad, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="volume"):
        candle_text(1, 1, 1, 1, -1)


def test_classes_from_the_move_against_the_band():
    close = np.array([100.0, 100.0, 100.0, 100.0, 100.0])
    atr = np.array([2.0, 2.0, 2.0, 2.0, np.nan])
    band = neutral_band(close, atr, 0.25)  # 0.5 % of the price
    ret = np.array([-0.006, -0.004, 0.004, 0.006, 0.01])
    assert classify_moves(ret, band).tolist() == [BEARISH, NEUTRAL, NEUTRAL, BULLISH, -1]
    with pytest.raises(ValueError):
        neutral_band(close, atr, -1)


def test_scaled_target_round_trips_and_persistence_is_zero():
    close = np.array([100.0, 200.0, 50.0])
    nxt = np.array([101.0, 198.0, 50.0])
    s = return_scale(close, nxt)
    y = scale_target(close, nxt, s)
    assert np.allclose(unscale_target(close, y, s), nxt)
    assert np.allclose(unscale_target(close, np.zeros(3), s), close)
    with pytest.raises(ValueError, match="spread"):
        return_scale(close, close * 1.01)


def test_splits_follow_in_time_with_an_embargo_of_window_plus_one():
    rows = np.arange(40, 400)
    plan = time_splits(rows, embargo_rows=31, fractions=(0.6, 0.2, 0.2))
    a = plan.assignment
    assert (np.diff(a[a >= 0]) >= 0).all()  # train, then validation, then test
    for earlier, later in ((0, 1), (1, 2)):
        assert rows[a == later].min() - rows[a == earlier].max() >= 31
    assert plan.embargoed == len(rows) - sum(plan.count(s) for s in ("train", "validation", "test"))
    assert plan.embargoed == 2 * 30  # 30 samples fall in each embargo


def test_too_few_samples_for_the_embargo_is_one_clear_error():
    with pytest.raises(ValueError, match="no validation/test split after a 31-candle embargo"):
        time_splits(np.arange(60), embargo_rows=31)
    with pytest.raises(ValueError, match="time order"):
        time_splits(np.array([3, 2, 1]), embargo_rows=1)
