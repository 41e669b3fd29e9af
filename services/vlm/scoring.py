"""Scoring an analysis when the candle its call is about has closed, beside naive baselines.

An analysis made at the close of candle t says a signal (buy/sell/hold) and a trend
(bullish/bearish/sideways). At the close of candle t + horizon the realised move is up, down
or flat (flat: smaller than ``flat_bps``). Buy and bullish hit on up, sell and bearish on
down, hold and sideways on flat. Beside the model, on the same analyses:

* ``hold``: always calls flat (what doing nothing scores);
* ``last_move``: calls the direction of candle t itself (persistence of the last move);
* ``majority``: calls the outcome seen most often so far for this symbol/interval (the
  majority class, learnt only from earlier outcomes).

A VLM that does not beat these is not reading the chart, whatever its summaries say.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

UP, DOWN, FLAT = "up", "down", "flat"
SIGNAL_CALLS = {"buy": UP, "sell": DOWN, "hold": FLAT}
TREND_CALLS = {"bullish": UP, "bearish": DOWN, "sideways": FLAT}
PREDICTORS = ("vlm", "hold", "last_move", "majority")
CALLS = ("signal", "trend")


def move(before: float, after: float, flat_bps: float) -> str:
    if before <= 0:
        return FLAT
    bps = (after / before - 1.0) * 10_000.0
    if bps > flat_bps:
        return UP
    if bps < -flat_bps:
        return DOWN
    return FLAT


@dataclass
class Pending:
    """What scoring needs of a published analysis (kept in Redis until its target candle closes)."""

    symbol: str
    interval: str
    open_time: int
    target_open_time: int
    entry_close: float
    prev_close: float | None
    signal: str
    trend: str


def score(p: Pending, exit_close: float, history: list[dict], flat_bps: float) -> dict:
    """Score ``p`` against the close of its target candle, given the earlier scores of its
    market (oldest first; they teach the majority baseline). Returns the record to append:
    ``{"realised": move, "hits": {"<call>|<predictor>": bool}}``."""
    seen = Counter(h["realised"] for h in history)
    majority = max(sorted(seen), key=lambda o: seen[o]) if seen else FLAT
    last = move(p.prev_close, p.entry_close, flat_bps) if p.prev_close is not None else FLAT
    baselines = {"hold": FLAT, "last_move": last, "majority": majority}
    calls = {"signal": {"vlm": SIGNAL_CALLS[p.signal], **baselines}, "trend": {"vlm": TREND_CALLS[p.trend], **baselines}}
    realised = move(p.entry_close, exit_close, flat_bps)
    hits = {f"{call}|{predictor}": called == realised for call, by in calls.items() for predictor, called in by.items()}
    return {"realised": realised, "hits": hits}


def hit_rates(history: list[dict]) -> dict[tuple[str, str], float]:
    """(call, predictor) -> share of hits over ``history`` (the rolling window)."""
    out = {}
    for call in CALLS:
        for predictor in PREDICTORS:
            marks = [h["hits"][f"{call}|{predictor}"] for h in history if f"{call}|{predictor}" in h["hits"]]
            out[(call, predictor)] = sum(marks) / len(marks) if marks else float("nan")
    return out


class Scoreboard:
    """Scores kept in memory (the offline scorecard); the service keeps the same records in Redis."""

    def __init__(self, window: int, flat_bps: float) -> None:
        self.window = window
        self.flat_bps = flat_bps
        self._history: dict[tuple[str, str], deque[dict]] = {}

    def score(self, p: Pending, exit_close: float) -> tuple[str, dict[tuple[str, str], bool]]:
        history = self._history.setdefault((p.symbol, p.interval), deque(maxlen=self.window))
        record = score(p, exit_close, list(history), self.flat_bps)
        history.append(record)
        return record["realised"], {tuple(k.split("|")): v for k, v in record["hits"].items()}

    def rate(self, symbol: str, interval: str, call: str, predictor: str) -> float:
        return hit_rates(list(self._history.get((symbol, interval), ())))[(call, predictor)]
