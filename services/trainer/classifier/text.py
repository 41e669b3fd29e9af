"""The candle text the model reads, written as seed 001 writes it.

The rule lives in ``libs.charting.classifier_input`` (serving writes the same string from the
package's ``config.text``); re-exported here for the trainer's modules.
"""

from __future__ import annotations

from libs.charting.classifier_input import (  # noqa: F401
    PRICE_MIN_DECIMALS,
    PRICE_SIGNIFICANT_DIGITS,
    TEXT_TEMPLATE,
    candle_text,
    format_price,
    format_volume,
    text_spec,
)
