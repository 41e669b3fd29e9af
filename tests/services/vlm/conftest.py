from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from libs.common.contracts import ChartEvent, KlineEvent
from libs.common.klines import Kline, read_kline_csv
from libs.llm.testing import TinyPair, write_tiny_qwen25vl

BTC_15M = Path(__file__).resolve().parents[2] / "data" / "klines" / "BTCUSDT-15m-2023-04-01-head3000.csv.gz"


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> TinyPair:
    """A random-weight Qwen2.5-VL-shaped GGUF pair written with the gguf package."""
    return write_tiny_qwen25vl(tmp_path_factory.mktemp("tiny-vlm"))


@pytest.fixture(scope="session")
def candles() -> list[Kline]:
    return read_kline_csv(BTC_15M, "BTCUSDT", "15m")[:80]


def chart_png(path: Path, candles: list[Kline], size=(1000, 750)) -> Path:
    """A candlestick picture of ``candles`` (what the charts service draws, in miniature)."""
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    lo, hi = min(k.low for k in candles), max(k.high for k in candles)
    w = size[0] / len(candles)
    y = lambda p: size[1] - 20 - (p - lo) / (hi - lo) * (size[1] - 40)  # noqa: E731
    for i, k in enumerate(candles):
        x = i * w + w / 2
        colour = "green" if k.close >= k.open else "red"
        d.line([(x, y(k.high)), (x, y(k.low))], fill=colour)
        d.rectangle([x - w / 3, min(y(k.open), y(k.close)), x + w / 3, max(y(k.open), y(k.close))], fill=colour)
    out = io.BytesIO()
    im.save(out, "PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(out.getvalue())
    return path


def chart_event(candles: list[Kline], last: int, uri: str, window: int = 60, symbol: str = "BTCUSDT") -> ChartEvent:
    shown = candles[max(last - window + 1, 0) : last + 1]
    return ChartEvent(
        symbol=symbol, interval="15m", open_time=shown[-1].open_time, first_open_time=shown[0].open_time,
        uri=uri, window=len(shown), preset="analysis", width=1000, height=750,
        indicators={"rsi_14": 55.2, "sma_20": shown[-1].close * 0.99, "macd": 12.5}, patterns=["hammer"],
    )


def kline_events(candles: list[Kline]) -> list[KlineEvent]:
    return [KlineEvent.from_kline(k, "replay") for k in candles]


class ScriptedServer:
    """An OpenAI-compatible chat-completions server on loopback (a real aiohttp server speaking
    the protocol) whose answers a test scripts: ``reply(n, body)`` gives the n-th answer's text
    (n from 1), and may sleep first. ``requests`` keeps every request body."""

    def __init__(self, reply, model: str = "scripted.gguf") -> None:
        self.reply = reply
        self.model = model
        self.requests: list[dict] = []
        self.url = ""
        self._runner = None

    async def __aenter__(self) -> "ScriptedServer":
        from aiohttp import web

        from libs.llm.testing import free_port

        async def chat(request: web.Request) -> web.Response:
            body = await request.json()
            self.requests.append(body)
            text = await self.reply(len(self.requests), body)
            return web.json_response(
                {"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}], "usage": {}}
            )

        async def models(_: web.Request) -> web.Response:
            return web.json_response({"data": [{"id": self.model}]})

        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        app.router.add_get("/v1/models", models)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()
