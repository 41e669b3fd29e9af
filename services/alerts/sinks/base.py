"""What every sink shares: the outcome of one request, error classes, and keeping secrets out of
every message. A webhook URL holds its credentials, so nothing a sink raises or logs may contain it."""

from __future__ import annotations

import asyncio
import re
from abc import ABC, abstractmethod
from typing import Iterable

import aiohttp

from libs.common.redact import redact, register
from services.alerts.notification import Notification

# HTTP statuses worth retrying besides 5xx: request timeout and "too early".
RETRYABLE_4XX = frozenset({408, 425})
TOO_MANY_REQUESTS = 429
BODY_PREVIEW = 200  # characters of an error answer kept in a dead letter's reason


class DeliveryError(Exception):
    """A request did not deliver. ``permanent``: resending the same request cannot succeed (a 4xx
    other than 429/408): the notification is dead-lettered. Otherwise it is retried, after
    ``retry_after`` seconds when the destination said so (429)."""

    def __init__(self, reason: str, *, permanent: bool = False, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent
        self.retry_after = retry_after


class Redactor:
    """Replaces every secret (and the path of a secret URL, which is the token) in a text; the
    secrets are also registered with ``libs.common.redact``, so logs, /metrics and dead letters
    of this process never show them either."""

    def __init__(self, secrets: Iterable[str]) -> None:
        parts: set[str] = set()
        for s in secrets:
            if not s:
                continue
            parts.add(s)
            path = re.sub(r"^[a-z]+://[^/]+", "", s)
            if len(path) > 8:
                parts.add(path)
        self._parts = sorted(parts, key=len, reverse=True)
        register(*parts)

    def __call__(self, text: str) -> str:
        for p in self._parts:
            text = text.replace(p, "<redacted>")
        return redact(text)


class Sink(ABC):
    """One destination. ``chat`` sinks are told of an alert when it starts, every ``repeat_s`` while
    it lasts and when it resolves; Alertmanager is sent every firing (it de-duplicates by labels)."""

    kind: str = "sink"
    chat: bool = True
    wants_chart: bool = False

    def __init__(self, name: str, url: str, min_severity: str = "info", secrets: Iterable[str] = ()) -> None:
        self.name = name
        self._url = url
        self.min_severity = min_severity
        self.redact = Redactor([url, *secrets])

    def __repr__(self) -> str:  # never the URL
        return f"<{type(self).__name__} {self.name}>"

    @abstractmethod
    async def send(self, session: aiohttp.ClientSession, n: Notification) -> dict[str, str]:
        """Deliver one notification (returning the answer's headers) or raise ``DeliveryError``."""

    async def post(self, session: aiohttp.ClientSession, url: str, **kw) -> tuple[int, dict[str, str], bytes]:
        """POST and return (status, headers, body); transport failures become retryable
        ``DeliveryError``s whose reason never holds the URL."""
        try:
            async with session.post(url, **kw) as resp:
                return resp.status, dict(resp.headers), await resp.read()
        except asyncio.TimeoutError:
            raise DeliveryError(f"{self.name}: timed out") from None
        except aiohttp.ClientError as exc:
            raise DeliveryError(self.redact(f"{self.name}: {type(exc).__name__}: {exc}")) from None

    def check(self, status: int, headers: dict[str, str], body: bytes) -> None:
        """Raise the ``DeliveryError`` an HTTP answer means; return on 2xx."""
        if 200 <= status < 300:
            return
        text = self.redact(" ".join(body[:BODY_PREVIEW * 2].decode("utf-8", "replace").split()))[:BODY_PREVIEW]
        reason = f"{self.name}: HTTP {status}" + (f": {text}" if text else "")
        if status == TOO_MANY_REQUESTS:
            raise DeliveryError(reason, retry_after=self.retry_after(headers, body))
        if 400 <= status < 500 and status not in RETRYABLE_4XX:
            raise DeliveryError(reason, permanent=True)
        raise DeliveryError(reason)

    def retry_after(self, headers: dict[str, str], body: bytes) -> float | None:
        """Seconds a 429 asks us to wait (RFC 9110 Retry-After in seconds; sinks add their own)."""
        return _seconds(_header(headers, "Retry-After"))

    def rate_limit_pause(self, headers: dict[str, str]) -> float | None:
        """Seconds to hold the next request even after a success (a destination that says its
        bucket is empty); None: no advice."""
        return None


def _header(headers: dict[str, str], name: str) -> str | None:
    for k, v in headers.items():
        if k.lower() == name.lower():
            return v
    return None


def _seconds(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP-date: rare from these APIs; the backoff applies instead
    return max(0.0, seconds)
