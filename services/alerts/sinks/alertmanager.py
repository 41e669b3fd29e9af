"""Alertmanager's API v2: ``POST /api/v2/alerts`` with a JSON array of alerts.

Labels identify an alert (Alertmanager de-duplicates on them); annotations are replaced by the
latest ones received. A client re-sends active alerts (we do every ``resend_s``) with an ``endsAt``
a few re-send periods ahead, so Alertmanager resolves them by itself if the client dies, and sends
``endsAt`` = the resolve time when the alert clears."""

from __future__ import annotations

from typing import Sequence

import aiohttp

from services.alerts.notification import Notification, rfc3339
from services.alerts.sinks.base import Sink

ALERTS_PATH = "/api/v2/alerts"


def postable_alert(n: Notification) -> dict:
    alert: dict = {"labels": dict(n.labels), "annotations": n.annotations(), "startsAt": rfc3339(n.starts_at)}
    if n.ends_at is not None:
        alert["endsAt"] = rfc3339(n.ends_at)
    if n.generator_url.startswith(("http://", "https://")):
        alert["generatorURL"] = n.generator_url
    return alert


class AlertmanagerSink(Sink):
    kind = "alertmanager"
    chat = False

    def __init__(self, name: str, base_url: str) -> None:
        super().__init__(name, base_url)
        self.base_url = base_url.rstrip("/")

    async def send(self, session: aiohttp.ClientSession, n: Notification) -> dict[str, str]:
        return await self.send_many(session, [n])

    async def send_many(self, session: aiohttp.ClientSession, ns: Sequence[Notification]) -> dict[str, str]:
        if not ns:
            return {}
        status, headers, body = await self.post(
            session, self.base_url + ALERTS_PATH, json=[postable_alert(n) for n in ns]
        )
        self.check(status, headers, body)
        return headers
