"""Slack incoming webhooks: a JSON ``{"text": ..., "blocks": [...]}`` POST; Slack answers 200
``ok``, or a 4xx with a short code as the body (``invalid_payload`` 400, ``invalid_token`` /
``action_prohibited`` 403, ``no_service`` / ``channel_not_found`` 404, ``channel_is_archived``
410) which resending cannot fix, or 429 with ``Retry-After`` (about one message per second per
webhook, short bursts tolerated). Incoming webhooks cannot upload files, so a market alert links
its chart instead of attaching it."""

from __future__ import annotations

import aiohttp

from services.alerts.notification import Notification, rfc3339
from services.alerts.sinks.base import Sink

# Slack's Block Kit limits: header text 150 characters, section text 3000, 10 fields of 2000.
HEADER_MAX = 150
SECTION_MAX = 3000
FIELDS_MAX = 10
FIELD_MAX = 2000
EMOJI = {"critical": ":red_circle:", "warning": ":large_orange_circle:", "info": ":large_blue_circle:"}


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def message_for(n: Notification) -> dict:
    emoji = ":white_check_mark:" if n.resolved else EMOJI.get(n.severity, "")
    title = ("Reminder: " if n.repeat else "") + n.headline()
    fields = []
    for name, value in (
        ("Symbol", n.symbol), ("Interval", n.interval),
        ("Candle", rfc3339(n.open_time) if n.open_time is not None else None),
        ("Value", f"{n.value:g}" if n.value is not None else None),
        ("Threshold", f"{n.threshold:g}" if n.threshold is not None else None),
        ("Since", rfc3339(n.starts_at)),
    ):
        if value:
            fields.append({"type": "mrkdwn", "text": _cut(f"*{name}*\n{value}", FIELD_MAX)})
    context = [f"fingerprint `{n.fingerprint}`"]
    if n.chart is not None:
        context.append(f"chart {n.chart.uri}")
    if n.generator_url.startswith(("http://", "https://")):
        context.append(f"<{n.generator_url}|dashboard>")
    blocks = [
        {"type": "header", "text": {"type": "plain_text", "text": _cut(f"{title}", HEADER_MAX)}},
        {"type": "section", "text": {"type": "mrkdwn", "text": _cut(f"{emoji} {n.message}", SECTION_MAX)}},
        {"type": "section", "fields": fields[:FIELDS_MAX]},
        {"type": "context", "elements": [{"type": "mrkdwn", "text": _cut(" · ".join(context), SECTION_MAX)}]},
    ]
    return {"text": _cut(f"{title}: {n.message}", SECTION_MAX), "blocks": blocks}


class SlackSink(Sink):
    kind = "slack"

    async def send(self, session: aiohttp.ClientSession, n: Notification) -> dict[str, str]:
        status, headers, body = await self.post(session, self._url, json=message_for(n))
        self.check(status, headers, body)
        return headers
