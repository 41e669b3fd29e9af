"""Live scoring: each forecast judged when its target candle closes, beside persistence.

For a forecast made at candle ``t`` for the close of candle ``t + h``: the error is
``|predicted - actual|``; persistence's is ``|close(t) - actual|`` (the same question,
answered by "nothing changes"). Direction: did the forecast move the same way as the market
from ``close(t)``? A flat market (actual == close(t)) has no direction and is left out of the
hit rate. Rolling over the last ``window`` scores per (model, symbol, interval, horizon):
MAE, persistence's MAE, their ratio (above 1: the model is behind persistence) and the
directional hit rate.

Truth and forecasts may arrive in either order (a slow model publishes after its target
closed): whichever comes second completes the score. Pure domain: no bus.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

ScoreKey = tuple[str, str, str, int]  # model, symbol, interval, horizon

# Closes remembered per stream for forecasts that arrive after their target closed: well past
# the longest horizon served (7) and a slow model's backlog.
TRUTH_KEEP = 512


@dataclass(frozen=True)
class Score:
    model: str
    model_version: str
    symbol: str
    interval: str
    horizon: int
    open_time: int  # the forecast candle (when it was made)
    target_open_time: int
    predicted: float
    actual: float
    baseline: float  # persistence: the close at open_time
    abs_error: float
    baseline_abs_error: float
    direction_hit: bool | None
    # Rolling, including this score:
    n: int
    mae: float
    baseline_mae: float
    mae_ratio: float | None
    direction_accuracy: float | None
    behind: bool


class Rolling:
    """The last ``window`` (error, persistence error, hit) of one key, with running sums."""

    def __init__(self, window: int) -> None:
        self.items: deque[tuple[float, float, bool | None]] = deque(maxlen=window)

    def add(self, err: float, base: float, hit: bool | None) -> None:
        self.items.append((err, base, hit))

    @property
    def n(self) -> int:
        return len(self.items)

    def mae(self) -> float:
        return sum(e for e, _, _ in self.items) / len(self.items)

    def baseline_mae(self) -> float:
        return sum(b for _, b, _ in self.items) / len(self.items)

    def ratio(self) -> float | None:
        base = self.baseline_mae()
        return self.mae() / base if base > 0 else None

    def direction_accuracy(self) -> float | None:
        hits = [h for _, _, h in self.items if h is not None]
        return sum(hits) / len(hits) if hits else None


@dataclass
class _Pending:
    model: str
    version: str
    horizon: int
    open_time: int
    predicted: float
    baseline: float


def direction_hit(predicted: float, baseline: float, actual: float) -> bool | None:
    if actual == baseline:
        return None
    return (predicted - baseline) * (actual - baseline) > 0


class LiveScorer:
    def __init__(self, window: int = 100, min_samples: int = 30, behind_ratio: float = 1.0) -> None:
        self.window = window
        self.min_samples = min_samples  # fewer scores than this never mark a model behind
        self.behind_ratio = behind_ratio
        self.rolling: dict[ScoreKey, Rolling] = {}
        self._truth: dict[tuple[str, str], OrderedDict[int, float]] = {}
        self._pending: dict[tuple[str, str, int], list[_Pending]] = {}

    def _roll(self, key: ScoreKey) -> Rolling:
        r = self.rolling.get(key)
        if r is None:
            r = self.rolling[key] = Rolling(self.window)
        return r

    def behind(self, model: str, symbol: str, interval: str, horizon: int = 1) -> bool:
        r = self.rolling.get((model, symbol, interval, horizon))
        return r is not None and self._behind(r)

    def _behind(self, r: Rolling) -> bool:
        ratio = r.ratio()
        return r.n >= self.min_samples and ratio is not None and ratio > self.behind_ratio

    def _score(self, symbol: str, interval: str, target: int, p: _Pending, actual: float) -> Score:
        err, base = abs(p.predicted - actual), abs(p.baseline - actual)
        hit = direction_hit(p.predicted, p.baseline, actual)
        r = self._roll((p.model, symbol, interval, p.horizon))
        r.add(err, base, hit)
        return Score(
            p.model, p.version, symbol, interval, p.horizon, p.open_time, target, p.predicted, actual, p.baseline,
            err, base, hit, r.n, r.mae(), r.baseline_mae(), r.ratio(), r.direction_accuracy(), self._behind(r),
        )

    def add_forecast(
        self, model: str, version: str, symbol: str, interval: str, open_time: int, last_close: float,
        targets: list[tuple[int, int, float]],
    ) -> list[Score]:
        """A published forecast: ``targets`` is ``(horizon, target_open_time, predicted close)``.
        Returns the scores it completes now (targets whose candle already closed)."""
        out = []
        truth = self._truth.get((symbol, interval), {})
        for horizon, target, predicted in targets:
            p = _Pending(model, version, horizon, open_time, predicted, last_close)
            if target in truth:
                out.append(self._score(symbol, interval, target, p, truth[target]))
            else:
                self._pending.setdefault((symbol, interval, target), []).append(p)
        return out

    def add_truth(self, symbol: str, interval: str, open_time: int, close: float) -> list[Score]:
        """A closed candle; returns the scores of the forecasts that targeted it."""
        truth = self._truth.setdefault((symbol, interval), OrderedDict())
        truth[open_time] = close
        while len(truth) > TRUTH_KEEP:
            truth.popitem(last=False)
        waiting = self._pending.pop((symbol, interval, open_time), [])
        return [self._score(symbol, interval, open_time, p, close) for p in waiting]

    def drop_unreachable(self, symbol: str, interval: str, before: int) -> int:
        """Forget forecasts of a stream whose target opened before ``before`` and never closed
        (a gap in the candles); returns how many."""
        stale = [k for k in self._pending if k[0] == symbol and k[1] == interval and k[2] < before]
        return sum(len(self._pending.pop(k)) for k in stale)

    def restore(self, key: ScoreKey, err: float, base: float, hit: bool | None) -> None:
        """Replay one earlier score (from scores.v1) into the rolling window after a restart."""
        self._roll(key).add(err, base, hit)

    @property
    def pending(self) -> int:
        return sum(len(v) for v in self._pending.values())
