"""Alerts service: alerts.v1 -> Alertmanager, Discord, Slack, a generic webhook; plus a watcher of
the candle topics (freshness, close-to-publish lag, holes) for the system alert rules."""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from libs.common import topics
from libs.common.bus import redis_client
from libs.common.contracts import AlertEvent
from libs.common.service import ServiceRuntime
from services.alerts.book import AlertBook
from libs.common.artefacts import ArtefactRoot
from services.alerts.charts import latest_chart
from services.alerts.delivery import Destination, RateLimiter, RetryPolicy
from services.alerts.dispatch import Dispatcher
from services.alerts.settings import AlertsSettings
from services.alerts.sinks.alertmanager import AlertmanagerSink
from services.alerts.sinks.base import Sink
from services.alerts.sinks.discord import DiscordSink
from services.alerts.sinks.slack import SlackSink
from services.alerts.sinks.webhook import WebhookSink
from services.alerts.watcher import StreamWatcher, WatcherMetrics

SETTINGS = AlertsSettings
log = logging.getLogger("klinebus.alerts")
# Requests a destination may take at once before its per-minute rate applies.
BURST = {"alertmanager": 10, "discord": 5, "slack": 3, "webhook": 10}


class AlertsMetrics:
    def __init__(self, m) -> None:
        self.received = m.counter("received_total", "Alert events consumed from alerts.v1", ["rule", "severity", "status"])
        self.notifications = m.counter(
            "notifications_total", "Alert notifications per destination and outcome (delivered, dead_lettered, pending)",
            ["sink", "outcome"],
        )
        self.attempts = m.counter("attempts_total", "HTTP requests to destinations by result", ["sink", "result"])
        self.request_seconds = m.histogram(
            "request_seconds", "Time of one successful request to a destination", ["sink"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.fired_to_delivered = m.histogram(
            "fired_to_delivered_seconds", "From an alert's fired_at to its delivery", ["sink"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900),
        )
        self.active = m.gauge("active", "Alerts firing (known to this service)")
        self.resend_failures = m.counter("resend_failures_total", "Failed re-sends of active alerts", ["sink"])
        self.owed = m.gauge("owed", "Notifications a destination still owes (it kept failing); retried every resend_s")


def build_sinks(settings: AlertsSettings) -> list[Sink]:
    sinks: list[Sink] = []
    for i, url in enumerate(settings.alertmanager_urls):
        sinks.append(AlertmanagerSink("alertmanager" if i == 0 else f"alertmanager-{i}", url))
    if settings.discord_webhook_url:
        sinks.append(DiscordSink("discord", settings.discord_webhook_url.get_secret_value(), settings.discord_min_severity))
    if settings.slack_webhook_url:
        sinks.append(SlackSink("slack", settings.slack_webhook_url.get_secret_value(), settings.slack_min_severity))
    if settings.webhook_url:
        secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
        sinks.append(WebhookSink("webhook", settings.webhook_url.get_secret_value(), settings.webhook_min_severity, secret))
    return sinks


def _per_minute(settings: AlertsSettings, kind: str) -> float:
    return float(getattr(settings, f"{kind}_per_minute"))


def create(settings: AlertsSettings, url: str) -> ServiceRuntime:
    runtime = ServiceRuntime(
        "alerts", settings, url,
        description="Sends alerts.v1 to Alertmanager, Discord, Slack and webhooks; watches candle topics' freshness.",
    )
    bus, metrics = runtime.bus, runtime.metrics
    am = AlertsMetrics(metrics)
    client = redis_client(url)
    state: dict[str, aiohttp.ClientSession] = {}
    policy = RetryPolicy(settings.attempts, settings.retry_initial_s, settings.retry_max_s, settings.max_retry_after_s)

    def session() -> aiohttp.ClientSession:
        if "http" not in state:
            state["http"] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=settings.request_timeout_s))
        return state["http"]

    destinations = [
        Destination(sink, RateLimiter(_per_minute(settings, sink.kind), BURST[sink.kind]), policy, session, am)
        for sink in build_sinks(settings)
    ]

    async def dead_letter(event: AlertEvent, reason: str) -> None:
        await bus.dead_letter(topics.ALERTS, event.to_json(), reason)

    artefacts = ArtefactRoot(settings.artifact_root(), settings.max_chart_bytes, metrics)  # charts: only from here

    async def chart(symbol: str, interval: str):
        return await latest_chart(client, symbol, interval, settings.chart_lookup_entries, artefacts, bus.dead_letter)

    dispatcher = Dispatcher(
        AlertBook(client, int(settings.max_age_s * 1000)), destinations, metrics=am, dead_letter=dead_letter,
        chart=chart, resend_ms=int(settings.resend_s * 1000), repeat_ms=int(settings.repeat_s * 1000),
        generator_url=settings.generator_url,
    )
    runtime.dispatcher = dispatcher  # type: ignore[attr-defined]  # for tests and the demo

    @bus.competing(topics.ALERTS, description="Deliver each alert to the configured destinations.")
    async def on_alert(event: AlertEvent) -> None:
        metrics.events_in.labels(topics.ALERTS).inc()
        with metrics.handle_seconds.labels(topics.ALERTS).time():
            await dispatcher.handle(event)

    @runtime.on_startup
    async def announce() -> None:
        names = ", ".join(d.name for d in destinations) or "none (alerts are only recorded)"
        log.info("alerts: destinations %s", names)  # names only: URLs hold secrets

    @runtime.background
    async def resend() -> None:
        while True:
            await asyncio.sleep(settings.resend_s)
            try:
                await dispatcher.tick()
            except Exception:  # noqa: BLE001 - Redis away for a moment: the next tick tries again
                log.exception("alerts: re-send tick failed")

    if settings.watch_topics:
        watcher = StreamWatcher(client, settings.watch_topics, WatcherMetrics(metrics), settings.watch_history)

        @runtime.background
        async def watch() -> None:
            primed = False
            while True:
                try:
                    if not primed:
                        await watcher.prime()
                        primed = True
                    await watcher.poll()
                except Exception:  # noqa: BLE001 - a Redis hiccup: read again next round
                    log.exception("alerts: reading the watched topics failed")
                await asyncio.sleep(settings.watch_every_s)

    @runtime.on_shutdown
    async def close() -> None:
        if "http" in state:
            await state.pop("http").close()
        await client.aclose()

    return runtime
