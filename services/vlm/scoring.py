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
from dataclasses import dataclass, field

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


@dataclass
class Rolling:
    window: int
    hits: deque[bool] = field(default_factory=deque)

    def add(self, hit: bool) -> None:
        self.hits.append(hit)
        while len(self.hits) > self.window:
            self.hits.popleft()

    @property
    def rate(self) -> float:
        return sum(self.hits) / len(self.hits) if self.hits else float("nan")


class Scoreboard:
    """Rolling hit rates per (symbol, interval, call, predictor)."""

    def __init__(self, window: int, flat_bps: float) -> None:
        self.window = window
        self.flat_bps = flat_bps
        self._outcomes: dict[tuple[str, str], Counter[str]] = {}
        self._rolling: dict[tuple[str, str, str, str], Rolling] = {}

    def calls(self, p: Pending) -> dict[str, dict[str, str]]:
        """The outcome each predictor called, per call kind (before the outcome is known)."""
        seen = self._outcomes.get((p.symbol, p.interval), Counter())
        majority = max(sorted(seen), key=lambda o: seen[o]) if seen else FLAT
        last = move(p.prev_close, p.entry_close, self.flat_bps) if p.prev_close is not None else FLAT
        baselines = {"hold": FLAT, "last_move": last, "majority": majority}
        return {
            "signal": {"vlm": SIGNAL_CALLS[p.signal], **baselines},
            "trend": {"vlm": TREND_CALLS[p.trend], **baselines},
        }

    def score(self, p: Pending, exit_close: float) -> tuple[str, dict[tuple[str, str], bool]]:
        """Score ``p`` against the close of its target candle: (realised move, {(call, predictor): hit})."""
        realised = move(p.entry_close, exit_close, self.flat_bps)
        hits = {}
        for call, by_predictor in self.calls(p).items():
            for predictor, called in by_predictor.items():
                hit = called == realised
                hits[(call, predictor)] = hit
                key = (p.symbol, p.interval, call, predictor)
                self._rolling.setdefault(key, Rolling(self.window)).add(hit)
        self._outcomes.setdefault((p.symbol, p.interval), Counter())[realised] += 1
        return realised, hits

    def rate(self, symbol: str, interval: str, call: str, predictor: str) -> float:
        r = self._rolling.get((symbol, interval, call, predictor))
        return r.rate if r else float("nan")
