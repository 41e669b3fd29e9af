"""Building the alerts service's dispatcher for tests: real Redis, real HTTP, fast retries."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from libs.common.bus import redis_client
from libs.common.contracts import AlertEvent
from libs.common.telemetry import ServiceMetrics
from services.alerts.app import AlertsMetrics
from services.alerts.book import AlertBook
from libs.common.artefacts import ArtefactRoot
from services.alerts.charts import latest_chart
from services.alerts.delivery import Destination, RateLimiter, RetryPolicy
from services.alerts.dispatch import Dispatcher
from services.alerts.sinks.base import Sink

FAST = RetryPolicy(attempts=4, initial_s=0.05, max_s=0.2, max_retry_after_s=5.0)
T0 = 1_760_000_000_000  # ms; a fixed "now" for tests that move the clock


@dataclass
class Clock:
    now: int = T0

    def __call__(self) -> int:
        return self.now


@dataclass
class Harness:
    dispatcher: Dispatcher
    metrics: AlertsMetrics
    registry: CollectorRegistry
    dead_letters: list[tuple[AlertEvent, str]] = field(default_factory=list)
    client: object = None

    def value(self, name: str, **labels: str) -> float:
        v = self.registry.get_sample_value(f"klinebus_alerts_{name}", labels)
        return 0.0 if v is None else v


_ids = itertools.count()


async def harness(
    redis_url: str, sinks: list[Sink], *, policy: RetryPolicy = FAST, per_minute: float = 0.0, burst: int = 10,
    clock: Clock | None = None, repeat_ms: int = 3_600_000, max_age_ms: int = 86_400_000, chart_lookup: int = 100,
    chart_root: str = "/nonexistent-klinebus-charts",
) -> Harness:
    import aiohttp

    registry = CollectorRegistry()
    metrics = AlertsMetrics(ServiceMetrics("alerts", registry=registry))
    client = redis_client(redis_url)
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
    dests = [Destination(s, RateLimiter(per_minute, burst), policy, lambda: session, metrics) for s in sinks]
    h = Harness(None, metrics, registry, client=client)  # type: ignore[arg-type]

    async def dead_letter(event: AlertEvent, reason: str) -> None:
        h.dead_letters.append((event, reason))

    async def chart(symbol: str, interval: str):
        return await latest_chart(client, symbol, interval, chart_lookup, ArtefactRoot(chart_root))

    kw = {"clock": clock} if clock is not None else {}
    h.dispatcher = Dispatcher(AlertBook(client, max_age_ms), dests, metrics=metrics, dead_letter=dead_letter,
                              chart=chart, repeat_ms=repeat_ms, resend_ms=60_000, **kw)
    h._session = session  # type: ignore[attr-defined]
    return h


async def close(h: Harness) -> None:
    await h._session.close()  # type: ignore[attr-defined]
    await h.client.aclose()  # type: ignore[attr-defined]


def alert(rule: str = "rsi_extreme", status: str = "firing", fired_at: int = T0, **kw) -> AlertEvent:
    base = dict(rule=rule, severity="warning", symbol="BTCUSDT", interval="1m", open_time=fired_at - 120_000,
                message="BTCUSDT 1m: rsi_14 81.2 overbought", value=81.2, threshold=80.0, labels={"feature": "rsi_14"},
                fired_at=fired_at, status=status)
    base.update(kw)
    return AlertEvent(**base)
