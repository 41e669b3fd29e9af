"""SIGKILL in the middle of a model call: the restarted process analyses the chart once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

from libs.common import topics
from tests.streams import add_events, read_topic, wait_for_events

from .conftest import ScriptedServer, chart_event, chart_png, kline_events

VALID = '{"trend":"bearish","confidence":0.25,"support":[],"resistance":[],"patterns":[],"signal":"sell","summary":"down"}'


async def test_kill_during_a_model_call_neither_loses_nor_doubles(redis_url, tmp_path, candles):
    arrived = asyncio.Event()

    async def reply(n: int, _body: dict) -> str:
        arrived.set()
        if n == 1:
            await asyncio.sleep(20)  # the process is killed while it waits for this answer
        return VALID

    shown = candles[:60]
    png = chart_png(tmp_path / "charts" / "btc.png", shown)
    await add_events(redis_url, kline_events(shown))
    server = await ScriptedServer(reply, model="served.gguf").__aenter__()
    env = {
        **os.environ,
        "KLINEBUS_REDIS_URL": redis_url, "KLINEBUS_DATA_DIR": str(tmp_path), "KLINEBUS_BACKEND": "remote",
        "KLINEBUS_REMOTE_URL": server.url, "KLINEBUS_CONSUMER_NAME": "vlm-0",
        "KLINEBUS_CALL_TIMEOUT_S": "60", "KLINEBUS_LOG_FORMAT": "text",
    }

    def start() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "services.vlm"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    proc = start()
    try:
        await add_events(redis_url, [chart_event(candles, 59, f"file://{png}")])
        await asyncio.wait_for(arrived.wait(), 60)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert await read_topic(redis_url, topics.ANALYSES) == []
        proc = start()  # same pod name: it takes its own lease back at once
        analyses = await wait_for_events(redis_url, topics.ANALYSES, 1, timeout=60, settle=1.0)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)
        await server.__aexit__()
    assert len(analyses) == 1 and analyses[0]["signal"] == "sell" and analyses[0]["model"] == "served.gguf"
    assert len(server.requests) == 2
    assert await read_topic(redis_url, topics.DEAD_LETTERS) == []
