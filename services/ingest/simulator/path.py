"""Plausible in-progress states of a recorded candle (the ``x: false`` updates of the replay).

A real candle's updates show the price of its latest trade, on the symbol's tick grid, and a
high and low that only widen as trades print, ending exactly at the recorded OHLC. We walk the
classic OHLC path: open, then the extreme nearer the open's side of the move first (low first
for a rising candle, high first for a falling one), then the other extreme, then close. Each
update stands at a seeded random point of that walk; volume and trade count grow with it.
"""

from __future__ import annotations

import random
from dataclasses import replace
from decimal import Decimal
from typing import Iterable, Sequence

from libs.common.klines import Kline

# Binance prints prices and quantities with at most 8 decimals (its filters' tick and lot sizes).
MAX_DECIMALS = 8


def decimals(x: float) -> int:
    """Decimals of the shortest text of ``x`` (74313.13 -> 2; 1.234e-05 -> 8)."""
    exponent = Decimal(repr(float(x))).normalize().as_tuple().exponent
    return min(max(-exponent, 0), MAX_DECIMALS) if isinstance(exponent, int) else MAX_DECIMALS


def grid_decimals(klines: Iterable[Kline]) -> tuple[int, int]:
    """(price decimals, quantity decimals) seen in recorded candles: every recorded price and
    quantity lies on the grid 10**-decimals, so in-progress values rounded to it look real."""
    price = quantity = 0
    for k in klines:
        price = max(price, decimals(k.open), decimals(k.high), decimals(k.low), decimals(k.close))
        quantity = max(quantity, decimals(k.volume), decimals(k.taker_buy_base))
    return price, quantity


def _walk(k: Kline) -> list[float]:
    """The OHLC path's turning points, open first, close last."""
    if k.close >= k.open:
        return [k.open, k.low, k.high, k.close]
    return [k.open, k.high, k.low, k.close]


def _at(points: Sequence[float], u: float) -> tuple[float, float, float]:
    """(price, high so far, low so far) at fraction ``u`` of the walk's length."""
    legs = [abs(b - a) for a, b in zip(points, points[1:])]
    total = sum(legs)
    if total == 0:
        return points[0], points[0], points[0]
    left = u * total
    seen = [points[0]]
    price = points[-1]
    for a, b, leg in zip(points, points[1:], legs):
        if left <= leg:
            price = a + (b - a) * (left / leg if leg else 0.0)
            break
        left -= leg
        seen.append(b)
    seen.append(price)
    return price, max(seen), min(seen)


def in_progress(k: Kline, updates: int, price_decimals: int, quantity_decimals: int, seed: int = 0) -> list[Kline]:
    """``updates`` states of ``k`` before it closes, in time order (deterministic per seed and candle)."""
    if updates <= 0:
        return []
    rng = random.Random(f"{seed}|{k.symbol}|{k.interval}|{k.open_time}")
    progress = sorted(rng.random() for _ in range(updates))
    points = _walk(k)
    # the grid must hold the candle itself
    price_decimals = max(price_decimals, *(decimals(p) for p in points))
    quantity_decimals = max(quantity_decimals, decimals(k.volume), decimals(k.taker_buy_base))
    out = []
    for u in progress:
        price, high, low = _at(points, u)
        # rounding is monotonic, so high only widens up, low only down, and low <= price <= high
        # still holds; the recorded OHLC lie on the grid, so nothing rounds past them.
        out.append(
            replace(
                k,
                close=round(price, price_decimals),
                high=round(high, price_decimals),
                low=round(low, price_decimals),
                volume=round(k.volume * u, quantity_decimals),
                quote_volume=round(k.quote_volume * u, MAX_DECIMALS),
                trades=int(k.trades * u),
                taker_buy_base=round(k.taker_buy_base * u, quantity_decimals),
                taker_buy_quote=round(k.taker_buy_quote * u, MAX_DECIMALS),
                closed=False,
            )
        )
    return out
