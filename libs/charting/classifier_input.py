"""What the chart classifier reads, written once for training (services/trainer/classifier) and
serving (services/inference): the last candle's text as seed 001 writes it, the chart PNG
decoded and checked, and the tokenisation. Both services call this module, so a model is served
with exactly the inputs it was trained on.

Text: the seed's index holds ``"Open: 45230.50, High: 45876.20, Low: 44892.10, Close: 45654.30,
Volume: 1234567"`` for the last candle of each chart: prices with two decimals, volume as an
integer. Two decimals erase a low-priced symbol (DOGEUSDT at 0.08123 would read ``0.08``), so a
price keeps at least ``PRICE_SIGNIFICANT_DIGITS`` significant digits; above 10,000 this is exactly
the seed's format. The template and the rule are recorded in the model package
(``klinebus.json`` -> ``config.text``, ``text_spec``) and serving writes the text from there.

Image: decode, RGB, check the size (the model's patch grid is fixed), hand over ``uint8``
(H, W, 3). Scaling to the vision model's mean and std happens inside the model (and the ONNX graph).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np

TEXT_TEMPLATE = "Open: {open}, High: {high}, Low: {low}, Close: {close}, Volume: {volume}"
PRICE_MIN_DECIMALS = 2  # the seed's format
PRICE_SIGNIFICANT_DIGITS = 5
VOLUME_DECIMALS = 0
MAX_TOKENS = 64  # the seed's text is ~42 BERT word pieces; room for long volumes and prices
IMAGE_SIZE = 224


class ChartImageError(ValueError):
    """A chart that cannot be fed to the model (corrupt, wrong size); one line."""


def format_price(x: float, min_decimals: int = PRICE_MIN_DECIMALS, significant: int = PRICE_SIGNIFICANT_DIGITS) -> str:
    if not math.isfinite(x):
        raise ValueError(f"price must be a finite number, got {x!r}")
    if x == 0:
        return f"{0:.{min_decimals}f}"
    magnitude = math.floor(math.log10(abs(x)))
    decimals = max(min_decimals, significant - 1 - magnitude)
    return f"{x:.{decimals}f}"


def format_volume(v: float, decimals: int = VOLUME_DECIMALS) -> str:
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"volume must be a finite number >= 0, got {v!r}")
    return f"{v:.{decimals}f}"


def candle_text(open: float, high: float, low: float, close: float, volume: float,  # noqa: A002
                spec: Mapping[str, Any] | None = None) -> str:
    """The text of one candle, e.g. ``Open: 45230.50, High: ..., Volume: 1234567``; ``spec``: a
    package's ``config.text`` (``text_spec`` keys), default this module's rule."""
    spec = spec or {}
    lo = int(spec.get("price_min_decimals", PRICE_MIN_DECIMALS))
    sig = int(spec.get("price_significant_digits", PRICE_SIGNIFICANT_DIGITS))
    vol = int(spec.get("volume_decimals", VOLUME_DECIMALS))
    return str(spec.get("template", TEXT_TEMPLATE)).format(
        open=format_price(open, lo, sig), high=format_price(high, lo, sig), low=format_price(low, lo, sig),
        close=format_price(close, lo, sig), volume=format_volume(volume, vol),
    )


def text_spec() -> dict:
    """What serving needs to write the same text (goes into ``klinebus.json``)."""
    return {
        "template": TEXT_TEMPLATE,
        "candle": "the chart's last candle",
        "price_min_decimals": PRICE_MIN_DECIMALS,
        "price_significant_digits": PRICE_SIGNIFICANT_DIGITS,
        "volume_decimals": VOLUME_DECIMALS,
    }


def load_chart(source: str | Path | bytes, size: int = IMAGE_SIZE, where: str | None = None) -> np.ndarray:
    """A PNG (path or bytes) -> ``uint8`` (size, size, 3); ``ChartImageError`` if it cannot be."""
    from PIL import Image, UnidentifiedImageError

    where = where or ("chart" if isinstance(source, (bytes, bytearray)) else str(source))
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as im:
            im.load()
            rgb = im.convert("RGB")
    except FileNotFoundError:
        raise ChartImageError(f"{where}: no such chart image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ChartImageError(f"{where}: not a readable image ({type(exc).__name__})") from None
    if rgb.size != (size, size):
        raise ChartImageError(f"{where}: chart is {rgb.size[0]}x{rgb.size[1]} px, the model takes {size}x{size}")
    return np.asarray(rgb, dtype=np.uint8)


def tokenize(tokenizer, texts: list[str], max_length: int = MAX_TOKENS) -> dict[str, np.ndarray]:
    """Token ids and attention mask, padded to ``max_length`` (the graph's fixed token axis)."""
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}
