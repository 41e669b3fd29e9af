"""HTTP receivers on loopback that answer as Discord, Slack, Alertmanager's webhook receivers or any
webhook do: each request is recorded (time, headers, body, parsed JSON or multipart parts) and
answered from a script, e.g. ``[discord_429(0.4), ok()]``; when the script runs out the last answer
repeats."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


@dataclass
class Answer:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"


def ok(body: bytes = b"", headers: dict[str, str] | None = None) -> Answer:
    return Answer(200, body, headers or {})


def discord_ok(remaining: int = 4, reset_after: float = 1.0) -> Answer:
    """Discord's ``?wait=true`` answer: the created message, with its rate-limit headers."""
    return Answer(200, b'{"id": "1", "type": 0}', {
        "X-RateLimit-Limit": "5", "X-RateLimit-Remaining": str(remaining),
        "X-RateLimit-Reset-After": f"{reset_after}", "X-RateLimit-Bucket": "abcd",
    })


def discord_429(retry_after: float) -> Answer:
    body = orjson.dumps({"message": "You are being rate limited.", "retry_after": retry_after, "global": False})
    return Answer(429, body, {"Retry-After": str(max(1, round(retry_after))), "X-RateLimit-Scope": "shared"})


def slack_ok() -> Answer:
    return Answer(200, b"ok", content_type="text/html")


def slack_error(status: int, code: str) -> Answer:
    return Answer(status, code.encode(), content_type="text/html")


def slack_429(retry_after: int) -> Answer:
    return Answer(429, b"rate_limited", {"Retry-After": str(retry_after)}, content_type="text/html")


@dataclass
class Request:
    at: float  # time.monotonic() on arrival
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    json: Any = None
    parts: dict[str, tuple[str | None, bytes]] = field(default_factory=dict)  # name -> (filename, bytes)


class Receiver:
    """``async with Receiver(script) as r``: ``r.url`` (path included), ``r.requests``."""

    def __init__(self, script: list[Answer] | None = None, path: str = "/hook") -> None:
        self.script = list(script or [ok()])
        self.path = path
        self.requests: list[Request] = []
        self._served = 0
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.arrived = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        req = Request(time.monotonic(), request.path, dict(request.query), dict(request.headers), body)
        ctype = request.headers.get("Content-Type", "")
        if ctype.startswith("multipart/"):
            reader = await _multipart(request, body)
            req.parts = reader
            if "payload_json" in reader:
                req.json = orjson.loads(reader["payload_json"][1])
        elif body:
            try:
                req.json = orjson.loads(body)
            except orjson.JSONDecodeError:
                req.json = None
        self.requests.append(req)
        answer = self.script[min(self._served, len(self.script) - 1)]
        self._served += 1
        self.arrived.set()
        return web.Response(status=answer.status, body=answer.body, headers=answer.headers,
                            content_type=answer.content_type)

    async def wait_for(self, n: int, timeout: float = 30.0) -> list[Request]:
        deadline = time.monotonic() + timeout
        while len(self.requests) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.requests)} of {n} requests reached {self.path} in {timeout:.0f}s")
            await asyncio.sleep(0.02)
        return self.requests

    async def __aenter__(self) -> "Receiver":
        app = web.Application(client_max_size=32 * 1024 * 1024)
        app.router.add_route("POST", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def _multipart(request: web.Request, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """Parse a multipart/form-data body the way Discord reads it (named parts, optional filenames)."""
    import email.parser
    import email.policy

    raw = b"Content-Type: " + request.headers["Content-Type"].encode() + b"\r\n\r\n" + body
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(raw)
    out: dict[str, tuple[str | None, bytes]] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        out[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return out
