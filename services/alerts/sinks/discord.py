"""Discord webhooks: one embed per alert; a market alert carries its symbol's latest chart as an
attachment shown inside the embed.

Wire format (Discord's "Execute Webhook"): JSON ``{"embeds": [...]}``; with a file, a
multipart/form-data body whose ``payload_json`` part holds the JSON and ``files[0]`` the PNG, the
embed pointing at it with ``attachment://<filename>``. ``?wait=true`` makes Discord confirm the
message was saved (without it a message that fails to save still answers 204).

Rate limits: a 429's JSON body carries ``retry_after`` in seconds (a float) and ``global``; the
``Retry-After`` header says the same. Every answer carries ``X-RateLimit-Remaining`` and
``X-RateLimit-Reset-After``: when the bucket is empty we hold the next request until it refills
instead of running into the 429 (Discord's docs: parse the headers, do not hard-code limits)."""

from __future__ import annotations

from datetime import datetime, timezone

import aiohttp
import orjson

from services.alerts.notification import Notification, rfc3339
from services.alerts.sinks.base import Sink, _header, _seconds

# Discord's documented embed limits (Channel resource, "Embed Limits").
TITLE_MAX = 256
DESCRIPTION_MAX = 4096
FIELD_VALUE_MAX = 1024
FOOTER_MAX = 2048
# Webhook attachments above Discord's smallest upload limit (10 MiB for unboosted servers) are
# refused with 413; a chart is ~100 KB, so a bigger file means something else went wrong.
ATTACHMENT_MAX_BYTES = 8 * 1024 * 1024

COLORS = {"critical": 0xE74C3C, "warning": 0xE67E22, "info": 0x3498DB, "resolved": 0x2ECC71}


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def embed_for(n: Notification, attachment: str | None = None) -> dict:
    fields = []
    if n.symbol:
        fields.append({"name": "Symbol", "value": n.symbol, "inline": True})
    if n.interval:
        fields.append({"name": "Interval", "value": n.interval, "inline": True})
    if n.open_time is not None:
        fields.append({"name": "Candle", "value": rfc3339(n.open_time), "inline": True})
    if n.value is not None:
        fields.append({"name": "Value", "value": f"{n.value:g}", "inline": True})
    if n.threshold is not None:
        fields.append({"name": "Threshold", "value": f"{n.threshold:g}", "inline": True})
    fields.append({"name": "Since", "value": rfc3339(n.starts_at), "inline": True})
    for f in fields:
        f["value"] = _cut(f["value"], FIELD_VALUE_MAX)
    embed: dict = {
        "title": _cut(("Reminder: " if n.repeat else "") + n.headline(), TITLE_MAX),
        "description": _cut(n.message, DESCRIPTION_MAX),
        "color": COLORS["resolved" if n.resolved else n.severity],
        "fields": fields,
        "timestamp": datetime.fromtimestamp(n.fired_at / 1000, tz=timezone.utc).isoformat(),
        "footer": {"text": _cut(f"klinebus alerts · {n.fingerprint}", FOOTER_MAX)},
    }
    if n.generator_url.startswith(("http://", "https://")):
        embed["url"] = n.generator_url
    if attachment:
        embed["image"] = {"url": f"attachment://{attachment}"}
    return embed


class DiscordSink(Sink):
    kind = "discord"
    wants_chart = True

    async def send(self, session: aiohttp.ClientSession, n: Notification) -> dict[str, str]:
        chart = n.chart if n.chart is not None and n.chart.png and len(n.chart.png) <= ATTACHMENT_MAX_BYTES else None
        payload: dict = {"embeds": [embed_for(n, chart.filename if chart else None)], "allowed_mentions": {"parse": []}}
        if chart is None:
            kw: dict = {"json": payload}
        else:
            payload["attachments"] = [{"id": 0, "filename": chart.filename}]
            form = aiohttp.FormData()
            form.add_field("payload_json", orjson.dumps(payload).decode(), content_type="application/json")
            form.add_field("files[0]", chart.png, filename=chart.filename, content_type="image/png")
            kw = {"data": form}
        status, headers, body = await self.post(session, self._url, params={"wait": "true"}, **kw)
        self.check(status, headers, body)
        return headers

    def retry_after(self, headers: dict[str, str], body: bytes) -> float | None:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("retry_after"), (int, float)):
            return max(0.0, float(doc["retry_after"]))
        return super().retry_after(headers, body)

    def rate_limit_pause(self, headers: dict[str, str]) -> float | None:
        if _header(headers, "X-RateLimit-Remaining") == "0":
            return _seconds(_header(headers, "X-RateLimit-Reset-After"))
        return None
