"""The alerts service as deployed: alerts.v1 consumed through its consumer group, destinations
from settings, dead letters on dead-letters.v1, JSON log lines that carry the candle."""

from __future__ import annotations

import io
import json
import logging

import pytest
from alert_receivers import Receiver, discord_ok, slack_error
from alert_support import alert

from libs.common import topics
from libs.common.klines import now_ms
from libs.common.settings import SettingsError, load_settings
from klinebus.pipeline import start_runtimes, stop_runtimes
from libs.common.telemetry import JsonFormatter
from services.alerts.settings import AlertsSettings
from tests.streams import add_events, read_topic, wait_for_events

SLACK_PATH = "/services/T0000000/B0000000/sLaCkToKeNs3cr3t"


async def test_alerts_from_the_topic_reach_discord_and_a_refusal_is_a_dead_letter(redis_url, tmp_path):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("klinebus")
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    try:
        async with Receiver([discord_ok()], "/api/webhooks/1/tok") as discord, \
                Receiver([slack_error(403, "invalid_token")], SLACK_PATH) as slack:
            overrides = {"alerts": {"discord_webhook_url": discord.url, "slack_webhook_url": slack.url,
                                    "watch_topics": [], "retry_initial_s": 0.01}}
            runtimes = await start_runtimes(["alerts"], redis_url, tmp_path, overrides, http=False)
            try:
                t = now_ms()
                await add_events(redis_url, [alert(fired_at=t, open_time=1_700_000_000_000)])
                await discord.wait_for(1)
                await slack.wait_for(1)
                (dead,) = await wait_for_events(redis_url, topics.DEAD_LETTERS, 1)
            finally:
                await stop_runtimes(runtimes)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert discord.requests[0].json["embeds"][0]["title"] == "[WARNING] rsi_extreme BTCUSDT 1m"
    assert dead["source"] == topics.ALERTS and dead["service"] == "alerts"
    assert dead["reason"] == "slack: HTTP 403: invalid_token"
    assert json.loads(dead["payload"])["rule"] == "rsi_extreme"
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    sent = [entry for entry in lines if entry["msg"] == "alert rsi_extreme firing sent to discord"]
    assert sent and sent[0]["symbol"] == "BTCUSDT" and sent[0]["interval"] == "1m" and sent[0]["open_time"] == 1_700_000_000_000
    assert "sLaCkToKeNs3cr3t" not in stream.getvalue()
    assert len(slack.requests) == 1


async def test_a_malformed_alert_is_dead_lettered_by_the_service(redis_url, tmp_path):
    import redis.asyncio as aioredis

    runtimes = await start_runtimes(["alerts"], redis_url, tmp_path, {"alerts": {"watch_topics": []}}, http=False)
    try:
        client = aioredis.Redis.from_url(redis_url)
        await client.xadd(topics.stream_key(topics.ALERTS), {"__data__": b'{"rule": "x", "severity": "loud"}'})
        await client.aclose()
        (dead,) = await wait_for_events(redis_url, topics.DEAD_LETTERS, 1)
    finally:
        await stop_runtimes(runtimes)
    assert dead["source"] == topics.ALERTS and "severity" in dead["reason"]
    assert len(await read_topic(redis_url, topics.ALERTS)) == 1


def test_a_wrong_webhook_url_stops_the_service_with_one_line_that_hides_it(monkeypatch):
    monkeypatch.setenv("KLINEBUS_DISCORD_WEBHOOK_URL", "discord.com/api/webhooks/1/sEcReT")
    with pytest.raises(SettingsError) as err:
        load_settings(AlertsSettings)
    assert str(err.value) == "invalid setting KLINEBUS_DISCORD_WEBHOOK_URL: a webhook URL must be an http(s) URL"
    monkeypatch.setenv("KLINEBUS_DISCORD_WEBHOOK_URL", "https://discord.com/api/webhooks/1/sEcReT")
    settings = load_settings(AlertsSettings)
    assert "sEcReT" not in repr(settings) and "sEcReT" not in str(settings.model_dump())


async def test_an_alert_a_destination_could_not_take_is_delivered_when_it_comes_back(redis_url, tmp_path):
    from alert_receivers import Answer, ok

    async with Receiver([Answer(503, b"down")]) as hook:
        overrides = {"alerts": {"webhook_url": hook.url, "watch_topics": [], "attempts": 2, "retry_initial_s": 0.01,
                                "resend_s": 0.3}}
        runtimes = await start_runtimes(["alerts"], redis_url, tmp_path, overrides, http=False)
        try:
            await add_events(redis_url, [alert(fired_at=now_ms())])
            await hook.wait_for(2)  # both tries failed: the webhook owes it
            hook.script, hook._served = [ok()], 0
            await hook.wait_for(3)  # paid at a later tick
            n = len(hook.requests)
            await runtimes[0].dispatcher.tick()
            assert len(hook.requests) == n  # and only once
        finally:
            await stop_runtimes(runtimes)
    assert hook.requests[-1].json["alerts"][0]["labels"]["alertname"] == "rsi_extreme"
    assert await read_topic(redis_url, topics.DEAD_LETTERS) == []


@pytest.mark.parametrize("case", ["proc-environ", "dev-zero", "not-png", "oversized", "outside-url", "outside-path"])
async def test_a_chart_uri_outside_the_artefact_root_is_never_read_nor_posted(redis_url, tmp_path, case):
    """The latest chart's uri comes from charts.v1, i.e. from anyone who can write that topic: only a
    PNG under the artefact root (<data_dir>/charts), within max_chart_bytes, is attached. Anything
    else: the alert goes out without an image, and the chart is a dead letter with the reason."""
    from libs.common.contracts import ChartEvent

    root = tmp_path / "charts"
    root.mkdir()
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
    (root / "env.png").write_text("KLINEBUS_DISCORD_WEBHOOK_URL=https://discord.test/api/webhooks/1/s3cr3t\n")
    (root / "big.png").write_bytes(png + b"\x00" * 1000)
    (tmp_path / "elsewhere.png").write_bytes(png)
    uri = {"proc-environ": "file:///proc/self/environ", "dev-zero": "file:///dev/zero",
           "not-png": (root / "env.png").as_uri(), "oversized": (root / "big.png").as_uri(),
           "outside-url": "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
           "outside-path": (tmp_path / "elsewhere.png").as_uri()}[case]
    t = now_ms()
    await add_events(redis_url, [ChartEvent(symbol="BTCUSDT", interval="1m", open_time=t - 120_000, uri=uri, window=60,
                                            first_open_time=t - 3_720_000, preset="analysis", width=10, height=10)])
    async with Receiver([discord_ok()], "/api/webhooks/1/tok") as discord:
        overrides = {"alerts": {"discord_webhook_url": discord.url, "watch_topics": [], "max_chart_bytes": 500}}
        runtimes = await start_runtimes(["alerts"], redis_url, tmp_path, overrides, http=False)
        try:
            await add_events(redis_url, [alert(fired_at=t, open_time=t - 120_000)])
            await discord.wait_for(1)
            (dead,) = await wait_for_events(redis_url, topics.DEAD_LETTERS, 1)
        finally:
            await stop_runtimes(runtimes)
    (req,) = discord.requests
    assert not any(k.startswith("files[") for k in req.parts) and "s3cr3t" not in str(req.json)
    assert dead["source"] == topics.CHARTS and dead["service"] == "alerts" and "\n" not in dead["reason"]
    kind = {"not-png": "not_png", "oversized": "too_large"}.get(case, "outside_root")
    assert dead["reason"].startswith(f"alerts refused chart {kind}: "), dead["reason"]
    assert "s3cr3t" not in dead["reason"] and uri[:40] in dead["payload"]
