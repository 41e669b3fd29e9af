"""What a Binance kline can carry: bounds on a candle's numbers, checked before a candle touches
the indicator state.

``KlineEvent`` already refuses what no candle can be (NaN, a non-positive price, high < low, a
negative volume). A candle can still pass that and be poison for the indicators: with
``volume=1.7e308`` OBV and VPT overflow to infinity, and a key whose state holds an infinity
never gives a finite value again. These bounds are the numbers a real kline can hold, with a
margin, chosen so that every indicator computed from them (their squares, their products with
prices, their sums over any history) stays finite.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# Binance keeps prices as 64-bit fixed-point numbers with 8 decimals (its filters' maxPrice is
# at most 92233720368.54775807, "the largest value a signed 64-bit integer can hold, / 1e8"),
# and a price string has 8 decimals, so no price lies outside [1e-8, 2**63 / 1e8].
MIN_PRICE = 1e-8
MAX_PRICE = (2**63 - 1) / 1e8
# Volumes are sums over an interval's trades, so they can exceed one order's maxQty: SHIBUSDT's
# busiest days traded ~1e13 base units. 1e20 is seven orders of magnitude above that, and low
# enough that price * volume (9.2e30) and volume**2 (1e40) summed over any history stay finite.
MAX_AMOUNT = 1e20
# Trade counts are Binance trade ids' difference: a signed 64-bit integer (and orjson, which
# writes the dead letter, refuses a larger int).
MAX_TRADES = 2**63 - 1

PRICES = ("open", "high", "low", "close")
AMOUNTS = ("volume", "quote_volume", "taker_buy_base", "taker_buy_quote")


def beyond(events: Sequence, cols: np.ndarray) -> dict[int, str]:
    """Candle index -> why it cannot be a Binance kline, for the candles of ``events`` whose
    numbers lie beyond these bounds. ``cols`` is the batch's (open_time, o, h, l, c, v) matrix
    the caller builds anyway: the common case is one vectorised comparison."""
    prices, volume = cols[1:5], cols[5]
    ok = ((prices >= MIN_PRICE) & (prices <= MAX_PRICE)).all(axis=0) & (volume <= MAX_AMOUNT)
    # The fields the engine does not read are checked one candle at a time: they are rarely
    # large, and a Python comparison per candle costs less than building three more columns.
    out: dict[int, str] = {}
    for i in np.flatnonzero(~ok).tolist():
        out[i] = _why(events[i])
    for i, e in enumerate(events):
        if i not in out and (e.quote_volume > MAX_AMOUNT or e.taker_buy_base > MAX_AMOUNT
                             or e.taker_buy_quote > MAX_AMOUNT or e.trades > MAX_TRADES):
            out[i] = _why(events[i])
    return out


def _why(e) -> str:
    where = f"{e.symbol} {e.interval} open_time={e.open_time}"
    for name in PRICES:
        value = getattr(e, name)
        if not MIN_PRICE <= value <= MAX_PRICE:
            return f"{where}: {name} {value!r} is beyond what a Binance kline can carry ([{MIN_PRICE}, {MAX_PRICE}])"
    for name in AMOUNTS:
        value = getattr(e, name)
        if value > MAX_AMOUNT:
            return f"{where}: {name} {value!r} is beyond what a Binance kline can carry (<= {MAX_AMOUNT:g})"
    return f"{where}: trades {e.trades} is beyond what a Binance kline can carry (<= {MAX_TRADES})"
