"""The candle text the model reads, written as seed 001 writes it.

The seed's index holds ``"Open: 45230.50, High: 45876.20, Low: 44892.10, Close: 45654.30,
Volume: 1234567"`` for the last candle of each chart: prices with two decimals, volume as an
integer. Two decimals erase a low-priced symbol (DOGEUSDT at 0.08123 would read ``0.08``), so a
price keeps at least ``PRICE_SIGNIFICANT_DIGITS`` significant digits; above 10,000 this is exactly
the seed's format. Serving must write the same string: the template and the rule are recorded
in the model package (``klinebus.json`` -> ``text``).
"""

from __future__ import annotations

import math

TEXT_TEMPLATE = "Open: {open}, High: {high}, Low: {low}, Close: {close}, Volume: {volume}"
PRICE_MIN_DECIMALS = 2  # the seed's format
PRICE_SIGNIFICANT_DIGITS = 5


def format_price(x: float) -> str:
    if not math.isfinite(x):
        raise ValueError(f"price must be a finite number, got {x!r}")
    if x == 0:
        return f"{0:.{PRICE_MIN_DECIMALS}f}"
    magnitude = math.floor(math.log10(abs(x)))
    decimals = max(PRICE_MIN_DECIMALS, PRICE_SIGNIFICANT_DIGITS - 1 - magnitude)
    return f"{x:.{decimals}f}"


def format_volume(v: float) -> str:
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"volume must be a finite number >= 0, got {v!r}")
    return f"{v:.0f}"


def candle_text(open: float, high: float, low: float, close: float, volume: float) -> str:  # noqa: A002
    """The text of one candle, e.g. ``Open: 45230.50, High: ..., Volume: 1234567``."""
    return TEXT_TEMPLATE.format(
        open=format_price(open), high=format_price(high), low=format_price(low), close=format_price(close),
        volume=format_volume(volume),
    )


def text_spec() -> dict:
    """What serving needs to write the same text (goes into ``klinebus.json``)."""
    return {
        "template": TEXT_TEMPLATE,
        "candle": "the chart's last candle",
        "price_min_decimals": PRICE_MIN_DECIMALS,
        "price_significant_digits": PRICE_SIGNIFICANT_DIGITS,
        "volume_decimals": 0,
    }
