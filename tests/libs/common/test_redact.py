"""Secrets are never echoed: each secret is fed through every error path it can reach (bad settings,
unreachable Redis, a webhook that fails, a dead letter's reason, a log line, /metrics, ``klinebus
tail``) and every output is searched for it."""

from __future__ import annotations

import io
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import redis
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CollectorRegistry

from libs.common import redact as R
from libs.common import topics
from libs.common.bus.deadletters import DeadLetters
from libs.common.telemetry import Health, ServiceMetrics, setup_logging, start_http

REPO = Path(__file__).resolve().parents[3]
PASSWORD = "hunter2-Pa55word"
REDIS_URL = f"redis://klinebus-features:{PASSWORD}@127.0.0.1:{{port}}/0"
DISCORD_TOKEN = "AbCdEf0123456789_discordTOKEN-xyz"
DISCORD = f"https://discord.com/api/webhooks/123456789/{DISCORD_TOKEN}"
SLACK_TOKEN = "T000/B000/XXXXslackSECRETXXXX"
SLACK = f"https://hooks.slack.com/services/{SLACK_TOKEN}"
AM_PASSWORD = "am-basic-auth-pw"
SECRETS = (PASSWORD, DISCORD_TOKEN, SLACK_TOKEN, AM_PASSWORD, "discordTOKEN", "slackSECRET")


def assert_clean(*outputs: str | bytes) -> None:
    for out in outputs:
        text = out.decode("utf-8", "replace") if isinstance(out, bytes) else out
        for secret in SECRETS:
            assert secret not in text, f"{secret!r} echoed in: {text[:2000]}"


@pytest.fixture(autouse=True)
def _fresh_registry():
    R.forget_all()
    yield
    R.forget_all()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the helper ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("redis://:hunter2@/0", "redis://:***@/0"),
    ("rediss://klinebus-ingest:s3cret@redis.internal:6380/0", "rediss://klinebus-ingest:***@redis.internal:6380/0"),
    ("redis://tokenonly@host:6379", "redis://***@host:6379"),
    ("POST https://discord.com/api/webhooks/1/abcDEF failed", "POST https://discord.com/api/webhooks/*** failed"),
    ("https://hooks.slack.com/services/T1/B2/xyz", "https://hooks.slack.com/services/***"),
    ("GET /x?token=abc123&page=2", "GET /x?token=***&page=2"),
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.x.y", "Authorization: Bearer ***"),
    ("hub token hf_abcdefghijklmnopqrstuvwxyz012345 refused", "hub token *** refused"),
    ("redis://localhost:6379/0 is fine", "redis://localhost:6379/0 is fine"),
])
def test_shapes_of_credentials_are_masked_without_registration(text, expected):
    assert R.redact(text) == expected


def test_a_registered_secret_is_masked_wherever_it_appears():
    R.register(REDIS_URL.format(port=1))
    assert R.redact(f"AUTH failed with {PASSWORD} (attempt 2)") == "AUTH failed with *** (attempt 2)"
    assert R.redact_url(REDIS_URL.format(port=1)) == "redis://klinebus-features:***@127.0.0.1:1/0"


def test_each_secret_of_a_keyring_is_masked_on_its_own():
    first, second = "s" * 40, "t" * 40
    R.register(f"old-key:{first},new-key:{second}")
    assert R.redact(f"verifying with {second} then {first}") == "verifying with *** then ***"


# --- bad settings, unreachable Redis: the command line ------------------------------------------------


def run_cli(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "klinebus", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "KLINEBUS_DATA_DIR": "/nonexistent-klinebus", **env})


def test_a_bad_redis_url_is_named_not_echoed():
    out = run_cli("run", "archive", KLINEBUS_REDIS_URL=f"redis://:{PASSWORD}@/0")
    assert out.returncode == 2
    assert "KLINEBUS_REDIS_URL" in out.stderr
    assert_clean(out.stdout, out.stderr)
    out = run_cli("run", "archive", KLINEBUS_REDIS_URL=f"http://user:{PASSWORD}@host/0")
    assert out.returncode == 2 and "KLINEBUS_REDIS_URL" in out.stderr
    assert_clean(out.stdout, out.stderr)


def test_bad_alerts_settings_never_echo_a_webhook():
    out = run_cli("run", "alerts", KLINEBUS_REDIS_URL="redis://127.0.0.1:1/0",
                  KLINEBUS_DISCORD_WEBHOOK_URL=DISCORD.replace("https", "ftp"),
                  KLINEBUS_SLACK_WEBHOOK_URL=SLACK.replace("https", "gopher"))
    assert out.returncode == 2 and "KLINEBUS_DISCORD_WEBHOOK_URL" in out.stderr
    assert_clean(out.stdout, out.stderr)


def test_tail_on_an_unreachable_redis_never_echoes_the_password():
    out = run_cli("tail", "klines.v1", "--redis-url", REDIS_URL.format(port=closed_port()))
    assert out.returncode != 0 and "tail" in out.stderr
    assert_clean(out.stdout, out.stderr)


def test_a_service_waiting_out_an_unreachable_redis_logs_no_password(tmp_path):
    env = {**os.environ, "KLINEBUS_REDIS_URL": REDIS_URL.format(port=closed_port()), "KLINEBUS_DATA_DIR": str(tmp_path),
           "KLINEBUS_LOG_FORMAT": "json", "KLINEBUS_HTTP_HOST": "127.0.0.1"}
    log = tmp_path / "out.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "klinebus", "run", "archive"], cwd=REPO, env=env,
                                stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "stalled" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
    finally:
        proc.kill()  # (SIGTERM is not handled before the service has started)
        proc.wait(30)
    assert_clean(log.read_text())


def test_tail_masks_credentials_inside_events(redis_url):
    c = redis.Redis.from_url(redis_url)
    c.xadd(topics.stream_key(topics.DEAD_LETTERS),
           {"__data__": f'{{"reason": "could not reach redis://u:{PASSWORD}@h/0 nor {DISCORD}"}}'})
    c.close()
    out = run_cli("tail", "dead-letters.v1", "--redis-url", redis_url)
    assert out.returncode == 0 and "could not reach" in out.stdout
    assert_clean(out.stdout, out.stderr)


# --- logs, dead letters, /metrics, a failing webhook: in the process ---------------------------------


async def test_logs_dead_letters_and_metrics_never_show_a_registered_secret(redis_url):
    from libs.common.settings import ServiceSettings, load_settings

    os.environ["KLINEBUS_REDIS_URL"] = REDIS_URL.format(port=6379)
    try:
        load_settings(ServiceSettings)  # registers the URL's password
    finally:
        del os.environ["KLINEBUS_REDIS_URL"]
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    setup_logging("INFO", "json", stream=stream)
    registry = CollectorRegistry()
    metrics = ServiceMetrics("redacttest", registry)
    client = aioredis.Redis.from_url(redis_url)
    runner = None
    try:
        log = logging.getLogger("klinebus.test")
        log.warning("connecting to %s", REDIS_URL.format(port=6379))
        log.info("password is %s", PASSWORD, extra={"url": DISCORD, "ctx": {"sink": SLACK, "n": 1}})
        try:
            raise ConnectionError(f"cannot reach {SLACK}")
        except ConnectionError:
            log.exception("delivery failed")
        R.register(DISCORD, SLACK)
        letters = DeadLetters("redacttest", client, 100, metrics)
        await letters.write("alerts.v1", f'{{"uri": "{DISCORD}"}}', f"discord: HTTP 404 at {DISCORD} ({PASSWORD})")
        metrics.counter("sink_errors_total", "errors", ["reason"]).labels(f"failed {SLACK}").inc()
        runner, port = await start_http(Health(), "127.0.0.1", 0, registry)
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as resp:
            exposition = await resp.text()
        assert "klinebus_redacttest_dead_letters_total" in exposition and "sink_errors_total" in exposition
        entries = await client.xrange(topics.stream_key(topics.DEAD_LETTERS))
        letter = entries[-1][1][b"__data__"].decode()
        assert "HTTP 404" in letter
        assert "connecting to" in stream.getvalue() and "delivery failed" in stream.getvalue()
        assert_clean(stream.getvalue(), letter, exposition)
    finally:
        if runner is not None:
            await runner.cleanup()
        await client.aclose()
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


async def test_a_failing_webhook_reports_its_failure_without_its_token():
    from services.alerts.sinks.alertmanager import AlertmanagerSink
    from services.alerts.sinks.base import DeliveryError
    from services.alerts.sinks.discord import DiscordSink
    from services.alerts.notification import Notification

    async def echo(request: web.Request) -> web.Response:  # a server that quotes the request back
        return web.Response(status=400, text=f"bad request to {request.url} auth={request.headers.get('Authorization')}")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    n = Notification(fingerprint="f", status="firing", labels={}, rule="r", severity="warning", message="m",
                     starts_at=1, ends_at=None, fired_at=1)
    reasons = []
    try:
        async with aiohttp.ClientSession() as http:
            sinks = [
                DiscordSink("discord", f"http://127.0.0.1:{port}/api/webhooks/123456789/{DISCORD_TOKEN}"),
                DiscordSink("discord-down", f"http://127.0.0.1:{closed_port()}/api/webhooks/1/{DISCORD_TOKEN}"),
                AlertmanagerSink("alertmanager", f"http://admin:{AM_PASSWORD}@127.0.0.1:{port}"),
            ]
            for sink in sinks:
                with pytest.raises(DeliveryError) as failed:
                    await sink.send(http, n)
                reasons.append(failed.value.reason)
    finally:
        await runner.cleanup()
    assert "HTTP 400" in reasons[0] and reasons[1].startswith("discord-down")
    assert_clean(*reasons, R.redact(" ".join(reasons)))
