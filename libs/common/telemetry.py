"""JSON logs, Prometheus metrics and the /metrics, /healthz, /readyz endpoints.

Metric names follow ``klinebus_<service>_<what>_<unit>``; counters end in
``_total``. ``/healthz`` says the process is alive (the event loop answers);
``/readyz`` says it is warmed up and connected, so Kubernetes only routes to
(and rolls onto) replicas that can do their work.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Callable

import orjson
from aiohttp import web
from libs.common.redact import RedactingFilter, RedactingFormatter, redact
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_STD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; extra fields given with ``extra=`` are kept."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STD_ATTRS and not key.startswith("_"):
                doc[key] = value
        if record.exc_text or record.exc_info:
            doc["exc"] = record.exc_text or self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


def setup_logging(level: str = "INFO", fmt: str = "json", stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.setFormatter(RedactingFormatter(handler.formatter))  # secrets never reach a log line
    handler.addFilter(RedactingFilter())  # (libs.common.redact): message, args, traceback, then the line
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # faststream logs every message at INFO; one line per candle per service drowns the useful lines.
    # (Each Bus quiets its own ``klinebus.<service>.faststream`` logger the same way.)
    logging.getLogger("faststream").setLevel(max(logging.WARNING, logging.getLevelName(level)))
    logging.getLogger("faststream.access").setLevel(logging.WARNING)


class ServiceMetrics:
    """The metrics every service has; services add their own with ``counter``/``gauge``/``histogram``."""

    def __init__(self, service: str, registry: CollectorRegistry = REGISTRY) -> None:
        self.service = service
        self.registry = registry
        self.events_in = self.counter("events_in_total", "Events consumed", ["topic"])
        self.events_out = self.counter("events_out_total", "Events published", ["topic"])
        self.dead_letters = self.counter("dead_letters_total", "Messages sent to the dead-letter stream", ["source", "reason"])
        self.retries = self.counter("retries_total", "Handler failures retried in place", ["topic"])
        self.duplicates = self.counter("duplicates_total", "Re-delivered or duplicate events skipped", ["topic"])
        self.handle_seconds = self.histogram(
            "handle_seconds", "Time to handle one event", ["topic"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )

    def _name(self, what: str) -> str:
        return f"klinebus_{self.service}_{what}"

    def _get_or_make(self, kind, what: str, doc: str, labels, **kw):
        name = self._name(what)
        lookup = name.removesuffix("_total") if kind is Counter else name
        existing = self.registry._names_to_collectors.get(lookup)  # one process may host several services
        if existing is not None:
            return existing
        return kind(name, doc, list(labels), registry=self.registry, **kw)

    def counter(self, what: str, doc: str, labels=()) -> Counter:
        return self._get_or_make(Counter, what, doc, labels)

    def gauge(self, what: str, doc: str, labels=()) -> Gauge:
        return self._get_or_make(Gauge, what, doc, labels)

    def histogram(self, what: str, doc: str, labels=(), **kw) -> Histogram:
        return self._get_or_make(Histogram, what, doc, labels, **kw)


class Health:
    """Readiness is a set of named checks; a service flips them as it warms up and connects."""

    def __init__(self) -> None:
        self.started = time.time()
        self._checks: dict[str, Callable[[], bool] | bool] = {}
        self._live: dict[str, Callable[[], bool]] = {}
        self.fatal: str | None = None

    def set_live(self, name: str, check: Callable[[], bool]) -> None:
        """A liveness check: /healthz fails while it is False (and /readyz with it)."""
        self._live[name] = check

    def live(self) -> tuple[bool, list[str]]:
        failing = []
        for name, check in self._live.items():
            try:
                ok = bool(check())
            except Exception:  # noqa: BLE001 - a failing check is a failing check
                ok = False
            if not ok:
                failing.append(name)
        return not failing and self.fatal is None, failing

    def fail(self, reason: str) -> None:
        """Something the process cannot recover from by itself (a background task died): /healthz
        fails too, so the orchestrator restarts the process instead of leaving it idle."""
        self.fatal = reason

    def set(self, name: str, ok: bool | Callable[[], bool]) -> None:
        self._checks[name] = ok

    def status(self) -> tuple[bool, dict[str, bool]]:
        states = {}
        for name, check in self._checks.items():
            try:
                states[name] = bool(check() if callable(check) else check)
            except Exception:  # noqa: BLE001 - a failing check is a not-ready check
                states[name] = False
        live, _ = self.live()
        return live and all(states.values()) and bool(states), states


async def start_http(
    health: Health, host: str, port: int, registry: CollectorRegistry = REGISTRY
) -> tuple[web.AppRunner, int]:
    """Serve /metrics, /healthz and /readyz; returns the runner and the bound port."""

    async def metrics(_: web.Request) -> web.Response:
        body = redact(generate_latest(registry).decode()).encode()  # labels may quote an error
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        live, failing = health.live()
        if not live:
            reason = redact(health.fatal or f"not live: {', '.join(failing)}")
            return web.json_response({"status": "failed", "reason": reason}, status=503)
        return web.json_response({"status": "ok", "uptime_s": round(time.time() - health.started, 1)})

    async def readyz(_: web.Request) -> web.Response:
        ready, checks = health.status()
        return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1] if site._server and site._server.sockets else port  # type: ignore[union-attr]
    return runner, bound


async def wait_forever() -> None:  # pragma: no cover - trivial
    await asyncio.Event().wait()
