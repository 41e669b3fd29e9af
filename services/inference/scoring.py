"""Live scoring: each forecast judged when its target candle closes, beside persistence.

For a forecast made at candle ``t`` for the close of candle ``t + h``: the error is
``|predicted - actual|``; persistence's is ``|close(t) - actual|`` (the same question,
answered by "nothing changes"). Direction: did the forecast move the same way as the market
from ``close(t)``? A flat market (actual == close(t)) has no direction and is left out of the
hit rate. Rolling over the last ``window`` scores per (model, symbol, interval, horizon):
MAE, persistence's MAE, their ratio (above 1: the model is behind persistence) and the
directional hit rate.

Intervals: a forecast that carries its 80 % interval (the package's split-conformal band) is
also judged on coverage (``lower <= actual <= upper``) and relative width ``(upper - lower) /
predicted``, beside persistence with the gate slice's empirical quantiles (the package's
``persistence_log_residual_quantiles``) on the same candles; rolling coverage should sit near 0.8.

Targets other than the close: a range/volatility model's ``range`` is judged on the target
candle's ``high - low`` and ``rvolN`` on ``sqrt(sum(log(c[t+k] / c[t+k-1])^2, k = 1..N))`` over the
N closes after the forecast candle (no score when one of them is missing: a gap).

Truth and forecasts may arrive in either order (a slow model publishes after its target
closed): whichever comes second completes the score. Pure domain: no bus.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

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
    target: str = "close"
    lower: float | None = None
    upper: float | None = None
    covered: bool | None = None
    band_width: float | None = None
    baseline_lower: float | None = None
    baseline_upper: float | None = None
    baseline_covered: bool | None = None
    baseline_band_width: float | None = None
    interval_n: int = 0
    coverage: float | None = None
    mean_band_width: float | None = None
    baseline_coverage: float | None = None
    baseline_mean_band_width: float | None = None


# (covered, width, baseline covered, baseline width); baseline parts None when the package has no baseline band.
IntervalItem = tuple[bool, float, bool | None, float | None]


class Rolling:
    """The last ``window`` (error, persistence error, hit) of one key, with running sums, and
    the interval outcomes of those of them that carried an interval."""

    def __init__(self, window: int) -> None:
        self.items: deque[tuple[float, float, bool | None]] = deque(maxlen=window)
        self.intervals: deque[IntervalItem | None] = deque(maxlen=window)

    def add(self, err: float, base: float, hit: bool | None, interval: IntervalItem | None = None) -> None:
        self.items.append((err, base, hit))
        self.intervals.append(interval)

    def interval_stats(self) -> tuple[int, float | None, float | None, float | None, float | None]:
        """``(n, coverage, mean width, baseline coverage, baseline mean width)`` over the window."""
        got = [i for i in self.intervals if i is not None]
        if not got:
            return 0, None, None, None, None
        base = [i for i in got if i[2] is not None and i[3] is not None]
        return (len(got), sum(i[0] for i in got) / len(got), sum(i[1] for i in got) / len(got),
                sum(bool(i[2]) for i in base) / len(base) if base else None,
                sum(float(i[3]) for i in base) / len(base) if base else None)

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

    def stats(self) -> tuple[float, float, float | None, float | None]:
        """``(mae, baseline mae, ratio, direction accuracy)``: the methods above, each sum taken once
        (``_score`` used to take the MAEs three times over the window), so the same floats."""
        mae, bmae = self.mae(), self.baseline_mae()
        return mae, bmae, (mae / bmae if bmae > 0 else None), self.direction_accuracy()


@dataclass
class _Pending:
    model: str
    version: str
    horizon: int
    open_time: int
    predicted: float
    baseline: float
    target: str = "close"
    lower: float | None = None
    upper: float | None = None
    baseline_lower: float | None = None
    baseline_upper: float | None = None


def _inside(lo: float | None, hi: float | None, actual: float) -> bool | None:
    return None if lo is None or hi is None else lo <= actual <= hi


def _width(lo: float | None, hi: float | None, point: float) -> float | None:
    return None if lo is None or hi is None or point == 0 else (hi - lo) / abs(point)


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
        # Per stream: open_time -> (close, high, low); high/low None when the features lack them.
        self._truth: dict[tuple[str, str], OrderedDict[int, tuple[float, float | None, float | None]]] = {}
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

    def _actual(self, symbol: str, interval: str, target: int, p: _Pending) -> float | None:
        """The realised value of ``p.target`` at ``target``; None when it cannot be known (a gap)."""
        truth = self._truth.get((symbol, interval), {})
        row = truth.get(target)
        if row is None:
            return None
        if p.target == "close":
            return row[0]
        if p.target == "range":
            return None if row[1] is None or row[2] is None else row[1] - row[2]
        if p.target.startswith("rvol"):
            closes = [truth[t][0] for t in truth if p.open_time <= t <= target]
            if len(closes) != p.horizon + 1 or min(closes) <= 0:
                return None
            return math.sqrt(sum(math.log(b / a) ** 2 for a, b in zip(closes, closes[1:])))
        return None

    def _score(self, symbol: str, interval: str, target: int, p: _Pending) -> Score | None:
        actual = self._actual(symbol, interval, target, p)
        if actual is None:
            return None
        err, base = abs(p.predicted - actual), abs(p.baseline - actual)
        hit = direction_hit(p.predicted, p.baseline, actual) if p.target == "close" else None
        covered, width = _inside(p.lower, p.upper, actual), _width(p.lower, p.upper, p.predicted)
        bcov, bwidth = _inside(p.baseline_lower, p.baseline_upper, actual), _width(p.baseline_lower, p.baseline_upper, p.baseline)
        r = self._roll((p.model, symbol, interval, p.horizon))
        r.add(err, base, hit, (covered, width, bcov, bwidth) if covered is not None and width is not None else None)
        n_iv, cov, mw, bcov_r, bmw = r.interval_stats()
        mae, bmae, ratio, acc = r.stats()
        behind = r.n >= self.min_samples and ratio is not None and ratio > self.behind_ratio  # ``_behind``
        return Score(
            p.model, p.version, symbol, interval, p.horizon, p.open_time, target, p.predicted, actual, p.baseline,
            err, base, hit, r.n, mae, bmae, ratio, acc, behind,
            p.target, p.lower, p.upper, covered, width, p.baseline_lower, p.baseline_upper, bcov, bwidth,
            n_iv, cov, mw, bcov_r, bmw,
        )

    def add_forecast(
        self, model: str, version: str, symbol: str, interval: str, open_time: int, last_close: float,
        targets: list[tuple[int, int, float]], steps: Sequence[Any] | None = None,
    ) -> list[Score]:
        """A published forecast: ``targets`` is ``(horizon, target_open_time, predicted close)``;
        ``steps`` (``model_runner.Step``, one per target, optional) say what each one forecasts
        (close, range, rvolN), persistence's value and both 80 % intervals. Returns the scores it
        completes now (targets whose candle already closed)."""
        out = []
        truth = self._truth.get((symbol, interval), {})
        for k, (horizon, target, predicted) in enumerate(targets):
            st = steps[k] if steps is not None else None
            if st is None:
                p = _Pending(model, version, horizon, open_time, predicted, last_close)
            else:
                p = _Pending(model, version, horizon, open_time, predicted, st.baseline, st.target, st.lower, st.upper,
                             st.baseline_lower, st.baseline_upper)
            if target in truth:
                s = self._score(symbol, interval, target, p)
                if s is not None:
                    out.append(s)
            else:
                self._pending.setdefault((symbol, interval, target), []).append(p)
        return out

    def add_truth(self, symbol: str, interval: str, open_time: int, close: float,
                  high: float | None = None, low: float | None = None) -> list[Score]:
        """A closed candle; returns the scores of the forecasts that targeted it."""
        truth = self._truth.get((symbol, interval))
        if truth is None:
            truth = self._truth[(symbol, interval)] = OrderedDict()
        truth[open_time] = (close, high, low)
        while len(truth) > TRUTH_KEEP:
            truth.popitem(last=False)
        waiting = self._pending.pop((symbol, interval, open_time), None)
        if not waiting:
            return []
        return [s for s in (self._score(symbol, interval, open_time, p) for p in waiting) if s is not None]

    def held(self, symbol: str, interval: str, open_time: int, n: int,
             interval_ms: int) -> list[tuple[float, float | None, float | None]] | None:
        """The ``n`` candles up to ``open_time`` (oldest first, ``(close, high, low)``) when every one
        is held; None when one is missing (a gap, or older than what is kept)."""
        truth = self._truth.get((symbol, interval), {})
        rows = [truth.get(open_time - k * interval_ms) for k in range(n - 1, -1, -1)]
        return None if any(r is None for r in rows) else rows  # type: ignore[return-value]

    def drop_unreachable(self, symbol: str, interval: str, before: int) -> int:
        """Forget forecasts of a stream whose target opened before ``before`` and never closed
        (a gap in the candles); returns how many."""
        stale = [k for k in self._pending if k[0] == symbol and k[1] == interval and k[2] < before]
        return sum(len(self._pending.pop(k)) for k in stale)

    def forget(self, belongs: Callable[[tuple[str, str]], bool]) -> list[ScoreKey]:
        """Drop everything held of the streams ``belongs((symbol, interval))`` selects (a partition
        another replica owns now: its scores there go on without this one). Returns the rolling
        keys dropped."""
        dropped = [k for k in self.rolling if belongs((k[1], k[2]))]
        for k in dropped:
            del self.rolling[k]
        for s in [s for s in self._truth if belongs(s)]:
            del self._truth[s]
        for k in [k for k in self._pending if belongs((k[0], k[1]))]:
            del self._pending[k]
        return dropped

    def restore(self, key: ScoreKey, err: float, base: float, hit: bool | None,
                interval: IntervalItem | None = None) -> None:
        """Replay one earlier score (from scores.v1) into the rolling window after a restart."""
        self._roll(key).add(err, base, hit, interval)

    @property
    def pending(self) -> int:
        return sum(len(v) for v in self._pending.values())
