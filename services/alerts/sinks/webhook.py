"""A generic JSON webhook in Alertmanager's webhook format (version 4), so a receiver written for
Alertmanager accepts it unchanged; with ``webhook_secret`` set the body is signed
(``X-Klinebus-Signature-256: sha256=<hex HMAC-SHA256 of the body>``, as GitHub signs its hooks)."""

from __future__ import annotations

import hashlib
import hmac

import aiohttp
import orjson

from services.alerts.notification import Notification, rfc3339
from services.alerts.sinks.base import Sink

SIGNATURE_HEADER = "X-Klinebus-Signature-256"
# Alertmanager's webhook payload writes the zero time for an alert that has not ended.
ZERO_TIME = "0001-01-01T00:00:00Z"


def payload_for(n: Notification) -> dict:
    alert = {
        "status": n.status,
        "labels": dict(n.labels),
        "annotations": n.annotations(),
        "startsAt": rfc3339(n.starts_at),
        "endsAt": rfc3339(n.ends_at) if n.resolved and n.ends_at is not None else ZERO_TIME,
        "generatorURL": n.generator_url,
        "fingerprint": n.fingerprint,
    }
    return {
        "version": "4",
        "groupKey": n.fingerprint,
        "truncatedAlerts": 0,
        "status": n.status,
        "receiver": "klinebus",
        "groupLabels": {"alertname": n.rule},
        "commonLabels": dict(n.labels),
        "commonAnnotations": alert["annotations"],
        "externalURL": n.generator_url,
        "alerts": [alert],
    }


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class WebhookSink(Sink):
    kind = "webhook"

    def __init__(self, name: str, url: str, min_severity: str = "info", secret: str | None = None) -> None:
        super().__init__(name, url, min_severity, secrets=[secret] if secret else [])
        self._secret = secret

    async def send(self, session: aiohttp.ClientSession, n: Notification) -> dict[str, str]:
        body = orjson.dumps(payload_for(n))
        headers = {"Content-Type": "application/json"}
        if self._secret:
            headers[SIGNATURE_HEADER] = signature(self._secret, body)
        status, resp_headers, resp_body = await self.post(session, self._url, data=body, headers=headers)
        self.check(status, resp_headers, resp_body)
        return resp_headers
