"""Market alert rules from a YAML file: predicted moves, RSI extremes, candlestick patterns, a model
behind persistence. Each firing is an alert with severity, labels and a human line; a resolve
follows when the condition clears; cooldown and de-duplication keep on-call from being flooded.

The file::

    rules:
      - name: big-move              # unique; the alert's ``rule``
        kind: predicted_move        # predicted_move | rsi | pattern | model_behind
        threshold_pct: 2.0          # |predicted close / last close - 1| * 100 at or above this fires
        severity: warning           # info | warning (default warning); critical is the system's
        models: [lstm-close-BTCUSDT-15m]   # optional filter (predicted_move, model_behind)
        symbols: [BTCUSDT]          # optional filter
        intervals: [15m]            # optional filter
        cooldown_candles: 3         # after firing, stay quiet this many candles even if it clears and returns
      - {name: rsi-extreme, kind: rsi, feature: rsi_14, above: 70, below: 30}
      - {name: engulfing, kind: pattern, features: [cdl_engulfing, cdl_hammer]}
      - {name: model-behind, kind: model_behind, ratio: 1.0, min_samples: 30}

``load_rules`` checks the whole file and raises ``RulesError`` whose ``problems`` are one line
per mistake. Pure domain: no bus; ``Firing`` becomes an ``alerts.v1`` event in the app.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from libs.indicators.catalog import FEATURE_NAMES

KINDS = ("predicted_move", "rsi", "pattern", "model_behind")
# Market alerts never page: "critical" is reserved for the system alerts of the Prometheus rules,
# which Alertmanager's routing sends to the pager (docs/alerts.md).
SEVERITIES = ("info", "warning")
_COMMON = {"name", "kind", "severity", "symbols", "intervals", "cooldown_candles", "description"}
_PARAMS = {
    "predicted_move": {"threshold_pct", "models", "horizon"},
    "rsi": {"feature", "above", "below"},
    "pattern": {"features"},
    "model_behind": {"ratio", "min_samples", "models", "horizon"},
}


class RulesError(ValueError):
    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(f"{source}: " + "; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Rule:
    name: str
    kind: str
    severity: str = "warning"
    symbols: frozenset[str] | None = None
    intervals: frozenset[str] | None = None
    models: frozenset[str] | None = None
    cooldown_candles: int = 0
    threshold_pct: float = 0.0
    feature: str = "rsi_14"
    above: float | None = None
    below: float | None = None
    features: tuple[str, ...] = ()
    ratio: float = 1.0
    min_samples: int = 30
    horizon: int = 1
    description: str = ""

    def applies(self, symbol: str, interval: str, model: str | None = None) -> bool:
        return (
            (self.symbols is None or symbol in self.symbols)
            and (self.intervals is None or interval in self.intervals)
            and (self.models is None or model is None or model in self.models)
        )


def _num(r: dict, key: str, where: str, problems: list[str], default: float | None = None) -> float | None:
    if key not in r:
        return default
    v = r[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        problems.append(f"{where}: {key} must be a number, got {v!r}")
        return default
    return float(v)


def _names(r: dict, key: str, where: str, problems: list[str]) -> frozenset[str] | None:
    if key not in r:
        return None
    v = r[key]
    if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
        problems.append(f"{where}: {key} must be a non-empty list of names, got {v!r}")
        return None
    return frozenset(v)


def parse_rules(doc: Any, source: str = "rules") -> list[Rule]:
    problems: list[str] = []
    if not isinstance(doc, dict) or not isinstance(doc.get("rules"), list):
        raise RulesError(source, ["the file must be a mapping with a 'rules' list"])
    rules, seen = [], set()
    for i, r in enumerate(doc["rules"]):
        where = f"rules[{i}]"
        if not isinstance(r, dict):
            problems.append(f"{where}: must be a mapping, got {type(r).__name__}")
            continue
        name, kind = r.get("name"), r.get("kind")
        if isinstance(name, str) and name:
            where = f"rules[{i}] ({name})"
        else:
            problems.append(f"{where}: needs a name")
        if name in seen:
            problems.append(f"{where}: the name is used twice")
        seen.add(name)
        if kind not in KINDS:
            problems.append(f"{where}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
            continue
        unknown = sorted(set(r) - _COMMON - _PARAMS[kind])
        if unknown:
            problems.append(f"{where}: unknown key(s) {', '.join(unknown)} for kind {kind}")
        severity = r.get("severity", "warning")
        if severity == "critical":
            problems.append(f"{where}: severity critical is for system alerts (they page); market alerts are info or warning")
        elif severity not in SEVERITIES:
            problems.append(f"{where}: severity must be one of {', '.join(SEVERITIES)}, got {severity!r}")
        cooldown = r.get("cooldown_candles", 0)
        if isinstance(cooldown, bool) or not isinstance(cooldown, int) or cooldown < 0:
            problems.append(f"{where}: cooldown_candles must be a whole number >= 0, got {cooldown!r}")
            cooldown = 0
        kw: dict[str, Any] = dict(
            name=str(name), kind=kind, severity=severity, cooldown_candles=cooldown,
            symbols=_names(r, "symbols", where, problems), intervals=_names(r, "intervals", where, problems),
            description=str(r.get("description", "")),
        )
        if kind in ("predicted_move", "model_behind"):
            kw["models"] = _names(r, "models", where, problems)
            h = r.get("horizon", 1)
            if isinstance(h, bool) or not isinstance(h, int) or h < 1:
                problems.append(f"{where}: horizon must be a whole number >= 1, got {h!r}")
            else:
                kw["horizon"] = h
        if kind == "predicted_move":
            t = _num(r, "threshold_pct", where, problems)
            if t is None or t <= 0:
                problems.append(f"{where}: threshold_pct must be a number > 0")
            else:
                kw["threshold_pct"] = t
        elif kind == "rsi":
            feature = r.get("feature", "rsi_14")
            if feature not in FEATURE_NAMES:
                problems.append(f"{where}: feature {feature!r} is not a feature the engine computes")
            above, below = _num(r, "above", where, problems), _num(r, "below", where, problems)
            if above is None and below is None:
                problems.append(f"{where}: needs above, below or both")
            if above is not None and below is not None and below >= above:
                problems.append(f"{where}: below ({below}) must be less than above ({above})")
            kw.update(feature=feature, above=above, below=below)
        elif kind == "pattern":
            feats = r.get("features")
            if not isinstance(feats, list) or not feats:
                problems.append(f"{where}: features must list pattern features, e.g. [cdl_engulfing]")
            else:
                bad = [f for f in feats if f not in FEATURE_NAMES or not str(f).startswith("cdl_")]
                if bad:
                    problems.append(f"{where}: {bad} are not candlestick pattern features (cdl_*)")
                kw["features"] = tuple(feats)
        elif kind == "model_behind":
            ratio = _num(r, "ratio", where, problems, 1.0)
            if ratio is not None and ratio <= 0:
                problems.append(f"{where}: ratio must be > 0")
            ms = r.get("min_samples", 30)
            if isinstance(ms, bool) or not isinstance(ms, int) or ms < 1:
                problems.append(f"{where}: min_samples must be a whole number >= 1, got {ms!r}")
                ms = 30
            kw.update(ratio=ratio or 1.0, min_samples=ms)
        rules.append(Rule(**kw))
    if problems:
        raise RulesError(source, problems)
    return rules


def load_rules(path: str | Path) -> list[Rule]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RulesError(str(path), [f"cannot read it: {exc.strerror or exc}"]) from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise RulesError(str(path), [f"not valid YAML{at}: {getattr(exc, 'problem', exc)}"]) from None
    return parse_rules(doc, str(path))


@dataclass(frozen=True)
class Firing:
    """One alert transition: ``status`` firing or resolved, for one rule and subject."""

    rule: Rule
    status: str
    symbol: str
    interval: str
    open_time: int
    message: str
    value: float | None
    threshold: float | None
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def severity(self) -> str:
        return self.rule.severity


@dataclass
class _State:
    active: bool = False
    fired_at: int | None = None  # open_time of the last firing
    seen_at: int | None = None  # open_time last evaluated: one decision per candle
    fired_message: str = ""  # what fired, for the resolve's message (labels stay the identity)


class AlertEngine:
    """Evaluates rules per candle; returns only transitions (fire, resolve), once per candle each."""

    def __init__(self, rules: Iterable[Rule]) -> None:
        self.rules = list(rules)
        self._state: dict[tuple[str, str, str, str], _State] = {}

    def _step(
        self, rule: Rule, symbol: str, interval: str, subject: str, open_time: int, interval_ms: int,
        condition: bool, message: str, value: float | None, threshold: float | None, labels: dict[str, str],
    ) -> Firing | None:
        st = self._state.setdefault((rule.name, symbol, interval, subject), _State())
        if st.seen_at is not None and open_time <= st.seen_at:
            return None  # this candle (or a later one) was decided already: a re-delivery
        st.seen_at = open_time
        labels = {"rule": rule.name, "kind": rule.kind, **labels}
        if condition and not st.active:
            if rule.cooldown_candles and st.fired_at is not None:
                if open_time - st.fired_at <= rule.cooldown_candles * interval_ms:
                    return None
            st.active, st.fired_at, st.fired_message = True, open_time, message
            return Firing(rule, "firing", symbol, interval, open_time, message, value, threshold, labels)
        if not condition and st.active:
            st.active = False
            if st.fired_message:
                message = f"{message} (fired: {st.fired_message})"
            return Firing(rule, "resolved", symbol, interval, open_time, f"resolved: {message}", value, threshold, labels)
        return None

    def restore(self, rule: str, symbol: str, interval: str, subject: str, status: str, open_time: int) -> None:
        """Replay the last alert of a subject (from alerts.v1) after a restart, so an active alert is
        not fired twice."""
        st = self._state.setdefault((rule, symbol, interval, subject), _State())
        st.active = status == "firing"
        st.seen_at = open_time
        if st.active:
            st.fired_at = open_time

    def restore_once(self, rule: str, symbol: str, interval: str, subject: str, status: str, open_time: int) -> None:
        """``restore`` for alerts read newest first: only the newest of each subject counts."""
        if (rule, symbol, interval, subject) not in self._state:
            self.restore(rule, symbol, interval, subject, status, open_time)

    def on_features(
        self, symbol: str, interval: str, open_time: int, interval_ms: int, values: dict[str, float]
    ) -> list[Firing]:
        out = []
        for rule in self.rules:
            if not rule.applies(symbol, interval):
                continue
            if rule.kind == "rsi":
                v = values.get(rule.feature)
                if v is None:
                    continue
                hi = rule.above is not None and v > rule.above
                lo = rule.below is not None and v < rule.below
                thr = rule.above if hi else rule.below if lo else (rule.above if rule.above is not None else rule.below)
                side = "overbought" if hi else "oversold" if lo else "back in range"
                msg = f"{symbol} {interval}: {rule.feature} {v:.1f} {side} (bounds {rule.below}..{rule.above})"
                f = self._step(rule, symbol, interval, rule.feature, open_time, interval_ms, hi or lo, msg, v, thr,
                               {"feature": rule.feature})
            elif rule.kind == "pattern":
                if not any(p in values for p in rule.features):
                    continue
                found = {p: values[p] for p in rule.features if values.get(p)}
                names = ", ".join(f"{p} ({'bullish' if v > 0 else 'bearish'})" for p, v in found.items())
                # The patterns found go in the message only: labels are the alert's identity and must be
                # the same on the firing and on its resolve (when no pattern is found any more).
                msg = f"{symbol} {interval}: {names or 'no pattern'} on the candle that opened at {open_time}"
                value = next(iter(found.values()), 0.0)
                f = self._step(rule, symbol, interval, "pattern", open_time, interval_ms, bool(found), msg, value, None, {})
            else:
                continue
            if f is not None:
                out.append(f)
        return out

    def on_forecast(
        self, model: str, symbol: str, interval: str, open_time: int, interval_ms: int, last_close: float,
        predicted_close: float, horizon: int = 1,
    ) -> list[Firing]:
        out = []
        for rule in self.rules:
            if rule.kind != "predicted_move" or rule.horizon != horizon or not rule.applies(symbol, interval, model):
                continue
            move = (predicted_close / last_close - 1.0) * 100.0 if last_close else 0.0
            msg = (f"{symbol} {interval}: {model} predicts close {predicted_close:.6g} in {horizon} candle(s), "
                   f"{move:+.2f}% from {last_close:.6g} (threshold {rule.threshold_pct}%)")
            f = self._step(rule, symbol, interval, model, open_time, interval_ms, abs(move) >= rule.threshold_pct,
                           msg, move, rule.threshold_pct, {"model": model})
            if f is not None:
                out.append(f)
        return out

    def on_score(
        self, model: str, symbol: str, interval: str, open_time: int, interval_ms: int, horizon: int,
        n: int, mae_ratio: float | None,
    ) -> list[Firing]:
        out = []
        for rule in self.rules:
            if rule.kind != "model_behind" or rule.horizon != horizon or not rule.applies(symbol, interval, model):
                continue
            behind = n >= rule.min_samples and mae_ratio is not None and mae_ratio > rule.ratio
            shown = f"{mae_ratio:.3f}" if mae_ratio is not None else "n/a"
            msg = (f"{symbol} {interval}: {model}'s rolling MAE is {shown}x persistence's over {n} scores "
                   f"(behind above {rule.ratio})")
            f = self._step(rule, symbol, interval, model, open_time, interval_ms, behind, msg, mae_ratio, rule.ratio,
                           {"model": model})
            if f is not None:
                out.append(f)
        return out
