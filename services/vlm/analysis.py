"""What the model is asked and what counts as an answer: the JSON schema (and so the grammar),
the prompt built from a charts.v1 event and the candles it shows, and the checks on the answer.

Nothing here knows the bus or the model; the worker feeds it a chart and a backend's text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from libs.common.contracts import ChartEvent
from libs.common.klines import Kline
from libs.llm.grammar import AnswerError, parse_answer

PROMPT_VERSION = "chart-analysis-v1"
TRENDS = ("bullish", "bearish", "sideways")
SIGNALS = ("buy", "sell", "hold")
MAX_LEVELS = 3
MAX_PATTERNS = 4
PATTERN_MAX_CHARS = 32
# Levels carry enough decimals to tell apart ~1/100 of the window's range: finer is noise on a
# chart, coarser cannot place a level between two neighbouring candles.
LEVEL_STEPS_PER_RANGE = 100
SYSTEM_PROMPT = (
    "You are a technical analyst of cryptocurrency candlestick charts. You read the chart image "
    "(candles with SMA/EMA lines, a MACD panel, an RSI panel, Hammer and Engulfing marks) and the "
    "indicator values given, and answer with one JSON object only."
)


@dataclass(frozen=True)
class PriceFrame:
    """The candles a chart shows, reduced to what the prompt and the checks need."""

    low: float
    high: float
    first_open: float
    last_close: float
    prev_close: float | None
    candles: int

    @classmethod
    def of(cls, candles: list[Kline]) -> "PriceFrame":
        if not candles:
            raise ValueError("no candles")
        return cls(
            low=min(k.low for k in candles),
            high=max(k.high for k in candles),
            first_open=candles[0].open,
            last_close=candles[-1].close,
            prev_close=candles[-2].close if len(candles) > 1 else None,
            candles=len(candles),
        )

    def level_decimals(self) -> int:
        span = self.high - self.low
        if span <= 0:
            return 8
        return int(min(8, max(0, math.ceil(math.log10(LEVEL_STEPS_PER_RANGE / span)))))


def answer_schema(frame: PriceFrame, summary_max_chars: int = 240) -> dict[str, Any]:
    """The answer's JSON schema for one chart: supports between the window's low and the last
    close, resistances between the last close and the window's high."""
    d = frame.level_decimals()

    def levels(lo: float, hi: float) -> dict[str, Any]:
        return {
            "type": "array",
            "maxItems": MAX_LEVELS,
            "items": {"type": "number", "minimum": lo, "maximum": hi, "x-decimals": d},
        }

    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["trend", "confidence", "support", "resistance", "patterns", "signal", "summary"],
        "properties": {
            "trend": {"enum": list(TRENDS)},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1, "x-decimals": 2},
            "support": levels(frame.low, frame.last_close),
            "resistance": levels(frame.last_close, frame.high),
            "patterns": {
                "type": "array",
                "maxItems": MAX_PATTERNS,
                "items": {"type": "string", "minLength": 1, "maxLength": PATTERN_MAX_CHARS},
            },
            "signal": {"enum": list(SIGNALS)},
            "summary": {"type": "string", "maxLength": summary_max_chars},
        },
    }


def _fmt(v: float) -> str:
    return f"{v:.8g}"


def indicator_summary(chart: ChartEvent, frame: PriceFrame) -> str:
    """A few lines a model can read next to the image (the values the chart's panels end on)."""
    change = (frame.last_close / frame.first_open - 1.0) * 100.0 if frame.first_open else 0.0
    lines = [
        f"{chart.symbol} {chart.interval}, last {frame.candles} candles: close {_fmt(frame.last_close)}, "
        f"range {_fmt(frame.low)}..{_fmt(frame.high)}, change {change:+.2f}%.",
    ]
    if chart.indicators:
        lines.append("Indicators at the last candle: " + ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(chart.indicators.items())) + ".")
    lines.append("Marked patterns: " + (", ".join(chart.patterns) if chart.patterns else "none") + ".")
    return "\n".join(lines)


def user_prompt(chart: ChartEvent, frame: PriceFrame) -> str:
    return (
        indicator_summary(chart, frame)
        + "\nAnswer with JSON: trend (bullish, bearish or sideways), confidence (0 to 1), up to "
        f"{MAX_LEVELS} support levels between {_fmt(frame.low)} and {_fmt(frame.last_close)}, up to {MAX_LEVELS} "
        f"resistance levels between {_fmt(frame.last_close)} and {_fmt(frame.high)}, the candlestick or chart "
        "patterns you see, a signal (buy, sell or hold) for the next candles, and a one-sentence summary."
    )


def retry_prompt(reason: str) -> str:
    return f"That answer was refused: {reason}. Answer again with one JSON object that fixes it."


@dataclass(frozen=True)
class Answer:
    trend: str
    confidence: float
    support: list[float]
    resistance: list[float]
    patterns: list[str]
    signal: str
    summary: str


def check_answer(text: str, schema: dict[str, Any]) -> Answer:
    """Parse and validate a model's text; ``AnswerError`` (one line) when it is no answer.

    The grammar already forces all of this on a backend that applies it; the checks stay for
    servers that ignore the grammar field and for anything the schema cannot say."""
    value = parse_answer(text, schema)
    support = sorted(float(v) for v in value["support"])
    resistance = sorted(float(v) for v in value["resistance"])
    if support and resistance and support[-1] > resistance[0]:
        raise AnswerError(f"support {support[-1]} is above resistance {resistance[0]}")
    return Answer(
        trend=value["trend"],
        confidence=float(value["confidence"]),
        support=support,
        resistance=resistance,
        patterns=[p.strip() for p in value["patterns"] if p.strip()],
        signal=value["signal"],
        summary=value["summary"].strip(),
    )
