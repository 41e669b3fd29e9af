"""Fixtures of real candles (tests/candles.py)."""

from __future__ import annotations

import pytest

from tests.candles import BTC_15M, DOGE_15M, ETH_1H_GAPS, Candles, load


@pytest.fixture(scope="session")
def btc() -> Candles:
    return load(BTC_15M)


@pytest.fixture(scope="session")
def eth_gaps() -> Candles:
    return load(ETH_1H_GAPS)


@pytest.fixture(scope="session", params=[BTC_15M, ETH_1H_GAPS, DOGE_15M], ids=lambda p: p.name.split("-")[0])
def real(request) -> Candles:
    return load(request.param)
