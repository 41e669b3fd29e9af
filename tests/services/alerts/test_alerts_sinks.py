"""The alert sinks against receivers that answer as Discord, Slack and a webhook do, over real
HTTP on loopback, with the alert book in a real Redis."""

from __future__ import annotations

import hashlib
import hmac
import logging

from alert_receivers import Answer, Receiver, discord_429, discord_ok, ok, slack_429, slack_error, slack_ok
from alert_support import T0, Clock, alert, close, harness

from libs.common.contracts import ChartEvent
from services.alerts.delivery import Outcome, RetryPolicy
from services.alerts.sinks.alertmanager import AlertmanagerSink
from services.alerts.sinks.discord import COLORS, DiscordSink
from services.alerts.sinks.slack import SlackSink
from services.alerts.sinks.webhook import SIGNATURE_HEADER, WebhookSink
from tests.streams import add_events

# What a real webhook URL holds after its host: the credentials (Discord: id/token, Slack: T/B/secret).
DISCORD_PATH = "/api/webhooks/123456789012345678/dIsCoRdToKeN-s3cr3t"
SLACK_PATH = "/services/T0000000/B0000000/sLaCkToKeNs3cr3t"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64  # the bytes are what must arrive, not a picture


async def test_discord_gets_one_embed_with_the_latest_chart_attached(redis_url, tmp_path):
    chart_file = tmp_path / "BTCUSDT-1m.png"
    chart_file.write_bytes(PNG)
    older = tmp_path / "old.png"
    older.write_bytes(b"old")
    await add_events(redis_url, [
        ChartEvent(symbol="BTCUSDT", interval="1m", open_time=T0 - 600_000, uri=older.as_uri(), window=60,
                   first_open_time=T0 - 4_200_000, preset="analysis", width=10, height=10),
        ChartEvent(symbol="ETHUSDT", interval="1m", open_time=T0 - 60_000, uri=older.as_uri(), window=60,
                   first_open_time=T0 - 3_600_000, preset="analysis", width=10, height=10),
        ChartEvent(symbol="BTCUSDT", interval="1m", open_time=T0 - 60_000, uri=chart_file.as_uri(), window=60,
                   first_open_time=T0 - 3_600_000, preset="analysis", width=10, height=10),
    ])
    async with Receiver([discord_ok()], DISCORD_PATH) as discord:
        h = await harness(redis_url, [DiscordSink("discord", discord.url)], chart_root=str(tmp_path))
        try:
            out = await h.dispatcher.handle(alert())
        finally:
            await close(h)
    assert out == [("discord", Outcome.DELIVERED)]
    (req,) = discord.requests
    assert req.query == {"wait": "true"}
    assert req.parts["files[0]"] == ("BTCUSDT-1m.png", PNG)
    (embed,) = req.json["embeds"]
    assert embed["image"] == {"url": "attachment://BTCUSDT-1m.png"}
    assert req.json["attachments"] == [{"id": 0, "filename": "BTCUSDT-1m.png"}]
    assert embed["title"] == "[WARNING] rsi_extreme BTCUSDT 1m"
    assert embed["description"] == "BTCUSDT 1m: rsi_14 81.2 overbought"
    assert embed["color"] == COLORS["warning"]
    assert {f["name"]: f["value"] for f in embed["fields"]}["Threshold"] == "80"


async def test_discord_429_retry_after_is_waited_before_the_next_try(redis_url):
    async with Receiver([discord_429(0.6), discord_ok()], DISCORD_PATH) as discord:
        h = await harness(redis_url, [DiscordSink("discord", discord.url)])
        try:
            out = await h.dispatcher.handle(alert(symbol=None, interval=None, open_time=None))
        finally:
            await close(h)
    assert out == [("discord", Outcome.DELIVERED)]
    first, second = discord.requests
    assert second.at - first.at >= 0.6
    assert second.json == first.json  # the same message, sent again
    assert "files[0]" not in first.parts and first.json["embeds"][0].get("image") is None  # no symbol: no chart
    assert h.value("attempts_total", sink="discord", result="rate_limited") == 1
    assert h.value("attempts_total", sink="discord", result="ok") == 1


async def test_discord_empty_bucket_holds_the_next_request_until_it_refills(redis_url):
    async with Receiver([discord_ok(remaining=0, reset_after=0.5)], DISCORD_PATH) as discord:
        h = await harness(redis_url, [DiscordSink("discord", discord.url)])
        try:
            await h.dispatcher.handle(alert(rule="a"))
            await h.dispatcher.handle(alert(rule="b"))
        finally:
            await close(h)
    first, second = discord.requests
    assert second.at - first.at >= 0.5


async def test_slack_refusal_is_dead_lettered_once_and_the_url_never_logged(redis_url, caplog):
    caplog.set_level(logging.DEBUG)
    async with Receiver([slack_error(404, "no_service")], SLACK_PATH) as slack:
        h = await harness(redis_url, [SlackSink("slack", slack.url)])
        try:
            event = alert()
            assert await h.dispatcher.handle(event) == [("slack", Outcome.DEAD_LETTERED)]
            assert await h.dispatcher.handle(event) == []  # a re-delivery: already settled
        finally:
            await close(h)
    assert len(slack.requests) == 1  # a 4xx other than 429 is never retried
    ((dead, reason),) = h.dead_letters
    assert dead == event
    assert reason == "slack: HTTP 404: no_service"
    assert h.value("notifications_total", sink="slack", outcome="dead_lettered") == 1
    logged = "\n".join(r.getMessage() + str(vars(r)) for r in caplog.records)
    assert "sLaCkToKeNs3cr3t" not in logged and "sLaCkToKeNs3cr3t" not in reason


async def test_slack_5xx_and_429_are_retried_and_retry_after_honoured(redis_url):
    async with Receiver([Answer(503, b"busy"), slack_429(1), slack_ok()], SLACK_PATH) as slack:
        h = await harness(redis_url, [SlackSink("slack", slack.url)])
        try:
            assert await h.dispatcher.handle(alert()) == [("slack", Outcome.DELIVERED)]
        finally:
            await close(h)
    r1, r2, r3 = slack.requests
    assert r3.at - r2.at >= 1.0
    body = r3.json
    assert body["text"] == "[WARNING] rsi_extreme BTCUSDT 1m: BTCUSDT 1m: rsi_14 81.2 overbought"
    assert body["blocks"][0] == {"type": "header", "text": {"type": "plain_text", "text": "[WARNING] rsi_extreme BTCUSDT 1m"}}


async def test_webhook_is_alertmanagers_payload_signed_with_the_secret(redis_url):
    secret = "hmac-key"
    async with Receiver([ok()]) as hook:
        h = await harness(redis_url, [WebhookSink("webhook", hook.url, secret=secret)])
        try:
            await h.dispatcher.handle(alert())
        finally:
            await close(h)
    (req,) = hook.requests
    expected = "sha256=" + hmac.new(secret.encode(), req.body, hashlib.sha256).hexdigest()
    assert req.headers[SIGNATURE_HEADER] == expected
    doc = req.json
    assert doc["version"] == "4" and doc["status"] == "firing"
    (a,) = doc["alerts"]
    assert a["labels"] == {"alertname": "rsi_extreme", "severity": "warning", "source": "klinebus",
                           "symbol": "BTCUSDT", "interval": "1m", "feature": "rsi_14"}
    assert a["endsAt"] == "0001-01-01T00:00:00Z"
    assert a["annotations"]["summary"] == "BTCUSDT 1m: rsi_14 81.2 overbought"


async def test_a_destination_still_failing_owes_the_alert_and_pays_when_it_comes_back(redis_url):
    policy = RetryPolicy(attempts=2, initial_s=0.01, max_s=0.02)
    async with Receiver([slack_ok()], SLACK_PATH) as slack, Receiver([Answer(500, b"down")]) as hook:
        h = await harness(redis_url, [SlackSink("slack", slack.url), WebhookSink("webhook", hook.url)], policy=policy)
        try:
            event = alert()
            assert await h.dispatcher.handle(event) == [("slack", Outcome.DELIVERED), ("webhook", Outcome.PENDING)]
            assert [sink for _, sink in await h.dispatcher.book.owed()] == ["webhook"]
            await h.dispatcher.tick()  # still down: still owed
            assert len(hook.requests) == 4 and [s for _, s in await h.dispatcher.book.owed()] == ["webhook"]
            hook.script, hook._served = [ok()], 0
            await h.dispatcher.tick()
            assert await h.dispatcher.book.owed() == []
            assert await h.dispatcher.handle(event) == []  # a re-delivery of the event: everyone has it
        finally:
            await close(h)
    assert len(slack.requests) == 1 and len(hook.requests) == 5
    assert hook.requests[-1].json["alerts"][0]["labels"]["alertname"] == "rsi_extreme"
    assert h.value("owed") == 0 and h.dead_letters == []


async def test_chat_hears_start_and_resolve_alertmanager_every_firing(redis_url):
    clock = Clock()
    async with Receiver([discord_ok()], DISCORD_PATH) as discord, Receiver([ok()], "/") as am:
        h = await harness(redis_url, [DiscordSink("discord", discord.url), AlertmanagerSink("alertmanager", am.url)],
                          clock=clock)
        try:
            await h.dispatcher.handle(alert(fired_at=T0))
            clock.now += 60_000
            await h.dispatcher.handle(alert(fired_at=T0 + 60_000, message="BTCUSDT 1m: rsi_14 85.0 overbought"))
            clock.now += 60_000
            await h.dispatcher.handle(alert(fired_at=T0 + 120_000, status="resolved", message="resolved: rsi back"))
            await h.dispatcher.handle(alert(fired_at=T0 + 120_000, status="resolved", message="resolved: rsi back"))
            await h.dispatcher.handle(alert(fired_at=T0 + 60_000))  # a stale firing re-delivered after the resolve
        finally:
            await close(h)
    assert [r.path for r in am.requests] == ["/api/v2/alerts"] * 3
    starts = {r.json[0]["startsAt"] for r in am.requests}
    assert starts == {"2025-10-09T08:53:20.000Z"}  # T0: the alert started with its first firing
    assert am.requests[1].json[0]["annotations"]["summary"] == "BTCUSDT 1m: rsi_14 85.0 overbought"
    assert am.requests[2].json[0]["endsAt"] == "2025-10-09T08:55:20.000Z"  # resolved at T0 + 2 min
    first, resolved = discord.requests
    assert first.json["embeds"][0]["title"] == "[WARNING] rsi_extreme BTCUSDT 1m"
    assert resolved.json["embeds"][0]["title"] == "[RESOLVED] rsi_extreme BTCUSDT 1m"
    assert resolved.json["embeds"][0]["color"] == COLORS["resolved"]


async def test_a_long_active_alert_is_repeated_in_chat_after_repeat_s(redis_url):
    clock = Clock()
    async with Receiver([slack_ok()], SLACK_PATH) as slack:
        h = await harness(redis_url, [SlackSink("slack", slack.url)], clock=clock, repeat_ms=600_000)
        try:
            await h.dispatcher.handle(alert(fired_at=T0))
            clock.now += 300_000
            await h.dispatcher.handle(alert(fired_at=T0 + 300_000))  # within repeat_s: quiet
            clock.now += 400_000
            await h.dispatcher.handle(alert(fired_at=T0 + 700_000))
        finally:
            await close(h)
    assert [r.json["blocks"][0]["text"]["text"] for r in slack.requests] == [
        "[WARNING] rsi_extreme BTCUSDT 1m", "Reminder: [WARNING] rsi_extreme BTCUSDT 1m"]


async def test_rate_limit_spaces_requests_to_one_destination(redis_url):
    async with Receiver([slack_ok()], SLACK_PATH) as slack:
        h = await harness(redis_url, [SlackSink("slack", slack.url)], per_minute=120, burst=1)  # one per 0.5 s
        try:
            for rule in ("a", "b", "c"):
                await h.dispatcher.handle(alert(rule=rule))
        finally:
            await close(h)
    times = [r.at for r in slack.requests]
    assert len(times) == 3 and all(b - a >= 0.45 for a, b in zip(times, times[1:]))


async def test_severity_below_a_destinations_minimum_is_not_sent_there(redis_url):
    async with Receiver([slack_ok()], SLACK_PATH) as slack:
        h = await harness(redis_url, [SlackSink("slack", slack.url, min_severity="critical")])
        try:
            assert await h.dispatcher.handle(alert()) == []
            assert await h.dispatcher.handle(alert(rule="down", severity="critical")) == [("slack", Outcome.DELIVERED)]
        finally:
            await close(h)
    assert len(slack.requests) == 1


async def test_an_alert_past_its_max_age_resolves_by_itself(redis_url):
    clock = Clock()
    async with Receiver([discord_ok()], DISCORD_PATH) as discord, Receiver([ok()], "/") as am:
        h = await harness(redis_url, [DiscordSink("discord", discord.url), AlertmanagerSink("alertmanager", am.url)],
                          clock=clock, max_age_ms=3_600_000)
        try:
            await h.dispatcher.handle(alert(fired_at=T0))
            clock.now += 60_000
            assert await h.dispatcher.tick() == 1  # still active: re-sent to Alertmanager
            clock.now += 3_600_000
            assert await h.dispatcher.tick() == 0
        finally:
            await close(h)
    posts = [r.json[0] for r in am.requests]
    assert len(posts) == 3
    assert posts[1]["endsAt"] == "2025-10-09T08:58:20.000Z"  # re-sent: now + 4 re-send periods
    assert posts[2]["endsAt"] == "2025-10-09T09:54:20.000Z"  # resolved at the tick
    assert discord.requests[-1].json["embeds"][0]["title"].startswith("[RESOLVED]")
    assert h.value("active") == 0


async def test_a_firing_and_its_resolve_handled_at_once_end_resolved(redis_url):
    import asyncio

    async with Receiver([ok()], "/") as am:
        h = await harness(redis_url, [AlertmanagerSink("alertmanager", am.url)])
        try:
            for i in range(20):  # both orders of arrival, interleaved at every await
                fire, clear = alert(rule=f"r{i}", fired_at=T0), alert(rule=f"r{i}", fired_at=T0 + 60_000, status="resolved")
                pair = (fire, clear) if i % 2 else (clear, fire)
                await asyncio.gather(*(h.dispatcher.handle(e) for e in pair))
            assert await h.dispatcher.book.active() == []
        finally:
            await close(h)


async def test_an_expiry_resolve_a_destination_missed_is_sent_at_the_next_tick(redis_url):
    clock = Clock()
    policy = RetryPolicy(attempts=1, initial_s=0.01, max_s=0.01)
    async with Receiver([slack_ok()], SLACK_PATH) as slack:
        h = await harness(redis_url, [SlackSink("slack", slack.url)], clock=clock, max_age_ms=60_000, policy=policy)
        try:
            await h.dispatcher.handle(alert(fired_at=T0))
            slack.script, slack._served = [Answer(502, b"bad gateway")], 0
            clock.now += 120_000
            await h.dispatcher.tick()
            assert await h.dispatcher.book.owed() != []
            slack.script, slack._served = [slack_ok()], 0
            await h.dispatcher.tick()
            assert await h.dispatcher.book.owed() == []
            await h.dispatcher.tick()
        finally:
            await close(h)
    texts = [r.json["blocks"][0]["text"]["text"] for r in slack.requests]
    # the refused resolve, its retry at the next tick, and nothing at the third
    assert texts == ["[WARNING] rsi_extreme BTCUSDT 1m", "[RESOLVED] rsi_extreme BTCUSDT 1m", "[RESOLVED] rsi_extreme BTCUSDT 1m"]
    assert h.value("notifications_total", sink="slack", outcome="pending") == 1
