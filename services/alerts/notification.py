"""What the sinks send: one alert's identity (its labels and their fingerprint), its state and its
words, built from an ``AlertEvent``. Plain data; knows nothing of the bus or of HTTP."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

from libs.common.contracts import AlertEvent

SEVERITY_ORDER = {"info": 0, "warning": 1, "critical": 2}
# Labels every alert carries besides the producer's own; the producer's cannot override them.
SOURCE_LABEL = ("source", "klinebus")


def rfc3339(ms: int) -> str:
    """Alertmanager wants RFC 3339 times; ours are integer ms since the epoch, UTC."""
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def labels_of(event: AlertEvent) -> dict[str, str]:
    """The identity of an alert, as Alertmanager sees it: the same labels are the same alert."""
    labels = {str(k): str(v) for k, v in event.labels.items()}
    labels.update({"alertname": event.rule, "severity": event.severity, SOURCE_LABEL[0]: SOURCE_LABEL[1]})
    if event.symbol:
        labels["symbol"] = event.symbol
    if event.interval:
        labels["interval"] = event.interval
    return labels


def fingerprint(labels: dict[str, str]) -> str:
    text = "\x1f".join(f"{k}\x1e{v}" for k, v in sorted(labels.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Chart:
    """The latest chart of a market alert's symbol, attached where the destination can show it."""

    uri: str
    filename: str
    png: bytes | None


@dataclass(frozen=True)
class Notification:
    fingerprint: str
    status: str  # firing | resolved
    labels: dict[str, str]
    rule: str
    severity: str
    message: str
    starts_at: int
    ends_at: int | None  # ms; the resolve time when resolved, else when it stops counting as active
    fired_at: int
    symbol: str | None = None
    interval: str | None = None
    open_time: int | None = None
    value: float | None = None
    threshold: float | None = None
    generator_url: str = ""
    chart: Chart | None = None
    repeat: bool = False  # a reminder of an alert chat already heard of

    @property
    def resolved(self) -> bool:
        return self.status == "resolved"

    @property
    def is_market(self) -> bool:
        return bool(self.symbol and self.interval)

    def annotations(self) -> dict[str, str]:
        out = {"summary": self.message}
        if self.value is not None:
            out["value"] = f"{self.value:g}"
        if self.threshold is not None:
            out["threshold"] = f"{self.threshold:g}"
        if self.open_time is not None:
            out["open_time"] = rfc3339(self.open_time)
        if self.chart is not None:
            out["chart"] = self.chart.uri
        return out

    def headline(self) -> str:
        where = f" {self.symbol} {self.interval}" if self.is_market else ""
        state = "RESOLVED" if self.resolved else self.severity.upper()
        return f"[{state}] {self.rule}{where}"

    def with_chart(self, chart: Chart | None) -> "Notification":
        return replace(self, chart=chart)

    def log_context(self) -> dict[str, Any]:
        """The fields a JSON log line carries so an alert can be followed to its candle."""
        ctx: dict[str, Any] = {"rule": self.rule, "fingerprint": self.fingerprint, "status": self.status}
        if self.symbol:
            ctx["symbol"] = self.symbol
        if self.interval:
            ctx["interval"] = self.interval
        if self.open_time is not None:
            ctx["open_time"] = self.open_time
        return ctx


def at_least(severity: str, minimum: str) -> bool:
    return SEVERITY_ORDER.get(severity, 0) >= SEVERITY_ORDER[minimum]
