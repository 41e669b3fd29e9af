"""The thin bus edge: a faststream RedisBroker with our conventions.

* Every topic is one Redis stream, read through a consumer group named after
  the consuming service (XREADGROUP + XACK). Groups are created at the start
  of the stream (id 0), so a service deployed after its producer still sees
  every retained event.
* A second, schema-hidden subscriber per topic reclaims entries that a dead
  replica left pending (XAUTOCLAIM after ``reclaim_idle_ms``).
* Every publish caps its stream (XADD MAXLEN ~).
* A message a handler cannot use goes to ``dead-letters.v1`` with the reason,
  the counter ``klinebus_<service>_dead_letters_total`` goes up, one log line
  says why, and the entry is acknowledged: bad input never blocks a stream.
  Any other exception leaves the entry pending, to be retried.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Awaitable, Callable

import redis.asyncio as aioredis
from faststream import AckPolicy, BaseMiddleware
from faststream.redis import RedisBroker, StreamSub
from faststream.redis.parser.message import MessageFormat
from pydantic import ValidationError

from libs.common import topics
from libs.common.contracts import DeadLetter, Event, InvalidEvent, payload_preview
from libs.common.klines import InvalidKline
from libs.common.telemetry import ServiceMetrics

log = logging.getLogger("klinebus.bus")

# Errors that mean "this message is bad", never "try again later".
BAD_INPUT_ERRORS: tuple[type[BaseException], ...] = (
    InvalidEvent,
    InvalidKline,
    ValidationError,
    json.JSONDecodeError,  # orjson's error is a subclass
    UnicodeDecodeError,
)


# The one field of a stream entry that holds the event (faststream's name for it).
DATA_FIELD = "__data__"


class PlainJSONFormat(MessageFormat):
    """Stream entries hold the event's JSON and nothing else.

    faststream's default framing is a binary envelope only faststream reads;
    subscribers in other languages must be able to ``XREAD`` and parse JSON.
    """

    __slots__ = ()

    @classmethod
    async def encode(cls, *, message, reply_to, headers, correlation_id, serializer=None, codec=None) -> bytes:
        msg = await cls.build(
            message=message,
            reply_to=reply_to,
            headers=headers,
            correlation_id=correlation_id,
            serializer=serializer,
            codec=codec,
        )
        return msg.data

    @classmethod
    def parse(cls, data: bytes) -> tuple[bytes, dict[str, Any]]:
        return data, {"content-type": "application/json"}


def is_cluster_url(url: str) -> bool:
    return url.startswith(("redis+cluster://", "rediss+cluster://"))


def _plain_url(url: str) -> str:
    return url.replace("+cluster://", "://", 1)


def redis_client(url: str) -> aioredis.Redis:
    """A plain redis-py asyncio client for the same server (admin work: groups, lengths)."""
    if is_cluster_url(url):
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url(_plain_url(url))  # type: ignore[return-value]
    return aioredis.Redis.from_url(url)


class Bus:
    """What one service holds of the bus: its broker, publishers, dead letters and metrics."""

    def __init__(
        self,
        service: str,
        url: str,
        *,
        consumer: str,
        stream_maxlen: int = 1_000_000,
        dead_letter_maxlen: int = 100_000,
        reclaim_idle_ms: int = 60_000,
        metrics: ServiceMetrics | None = None,
        polling_interval_ms: int = 100,
    ) -> None:
        self.service = service
        self.url = url
        self.consumer = consumer
        self.stream_maxlen = stream_maxlen
        self.dead_letter_maxlen = dead_letter_maxlen
        self.reclaim_idle_ms = reclaim_idle_ms
        self.polling_interval_ms = polling_interval_ms
        self.metrics = metrics or ServiceMetrics(service)
        self._groups: list[str] = []
        self.broker = self._make_broker()
        self._publishers: dict[str, Any] = {}
        self._dead_letter_pub = self.publisher(topics.DEAD_LETTERS, DeadLetter)

    @classmethod
    def from_settings(cls, service: str, settings, url: str, metrics: ServiceMetrics | None = None) -> "Bus":
        return cls(
            service,
            url,
            consumer=settings.consumer_name,
            stream_maxlen=settings.stream_maxlen,
            dead_letter_maxlen=settings.dead_letter_maxlen,
            reclaim_idle_ms=settings.reclaim_idle_ms,
            metrics=metrics,
        )

    def _make_broker(self) -> RedisBroker:
        middleware = _dead_letter_middleware(self)
        common = dict(middlewares=[middleware], message_format=PlainJSONFormat, logger=logging.getLogger(f"klinebus.{self.service}.faststream"))
        if is_cluster_url(self.url):
            from faststream.redis import RedisClusterBroker  # type: ignore[attr-defined]

            return RedisClusterBroker(_plain_url(self.url), **common)
        return RedisBroker(self.url, **common)

    # --- consuming ---------------------------------------------------------------------

    def subscriber(
        self, topic: str, *, description: str = "", max_records: int | None = None
    ) -> Callable[[Callable[..., Awaitable[Any]]], Any]:
        """Decorate a handler to consume ``topic`` in this service's consumer group."""
        key = topics.stream_key(topic)
        self._groups.append(key)
        live = self.broker.subscriber(
            stream=StreamSub(
                key,
                group=self.service,
                consumer=self.consumer,
                polling_interval=self.polling_interval_ms,
                max_records=max_records,
            ),
            ack_policy=AckPolicy.NACK_ON_ERROR,
            title=f"{self.service}:{topic}",
            description=description or None,
        )
        reclaim = self.broker.subscriber(
            stream=StreamSub(
                key,
                group=self.service,
                consumer=self.consumer,
                min_idle_time=self.reclaim_idle_ms,
                polling_interval=max(self.reclaim_idle_ms // 4, 1000),
            ),
            ack_policy=AckPolicy.NACK_ON_ERROR,
            include_in_schema=False,
        )

        def decorate(handler: Callable[..., Awaitable[Any]]) -> Any:
            return live(reclaim(handler))

        return decorate

    async def ensure_groups(self) -> None:
        """Create this service's consumer groups at the stream's start (idempotent)."""
        client = redis_client(self.url)
        try:
            for key in self._groups:
                try:
                    await client.xgroup_create(key, self.service, id="0", mkstream=True)
                except aioredis.ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise
        finally:
            await client.aclose()

    # --- publishing --------------------------------------------------------------------

    def publisher(self, topic: str, model: type[Event], description: str = "") -> Any:
        if topic not in self._publishers:
            maxlen = self.dead_letter_maxlen if topic == topics.DEAD_LETTERS else self.stream_maxlen
            self._publishers[topic] = self.broker.publisher(
                stream=StreamSub(topics.stream_key(topic), maxlen=maxlen),
                schema=model,
                title=f"{topic}:{self.service}",
                description=description or (model.__doc__ or "").strip().splitlines()[0],
            )
        return self._publishers[topic]

    async def publish(self, event: Event) -> None:
        pub = self._publishers.get(event.topic)
        if pub is None:
            raise KeyError(f"{self.service} has no publisher for {event.topic}; declare it with Bus.publisher")
        await pub.publish(event.model_dump(mode="json"))
        self.metrics.events_out.labels(event.topic).inc()

    async def dead_letter(self, source: str, raw: Any, reason: str) -> None:
        reason = " ".join(str(reason).split())  # always one line
        log.warning("dead letter from %s: %s", source, reason, extra={"service": self.service, "source": source})
        self.metrics.dead_letters.labels(source, _reason_label(reason)).inc()
        await self._dead_letter_pub.publish(
            DeadLetter(source=source, service=self.service, reason=reason, payload=payload_preview(raw)).model_dump(
                mode="json"
            )
        )


def _reason_label(reason: str) -> str:
    """A bounded label value: the reason's kind, not its details (keeps Prometheus cardinality low)."""
    head = reason.split(":")[0].strip()
    for word in ("malformed JSON", "not a kline", "high", "close_time", "unknown interval", "symbol"):
        if word in reason:
            return word.replace(" ", "_")
    return head[:40] if head.isidentifier() else "invalid"


def _dead_letter_middleware(bus: Bus) -> type[BaseMiddleware]:
    class DeadLetterMiddleware(BaseMiddleware):
        async def consume_scope(self, call_next, msg):  # type: ignore[override]
            source = _topic_of(msg)
            try:
                return await call_next(msg)
            except BAD_INPUT_ERRORS as exc:
                await bus.dead_letter(source, msg.body, _one_line(exc))
                return None

    return DeadLetterMiddleware


def _topic_of(msg: Any) -> str:
    channel = getattr(msg, "raw_message", {}).get("channel", b"")
    if isinstance(channel, bytes):
        channel = channel.decode()
    # klinebus:{klines.v1} -> klines.v1
    if "{" in channel and "}" in channel:
        return channel[channel.index("{") + 1 : channel.index("}")]
    return channel or "unknown"


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, (InvalidEvent, InvalidKline)):
        return exc.reason
    if isinstance(exc, json.JSONDecodeError):
        return f"malformed JSON: {exc}"
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "payload"
        return f"{exc.title}: {where}: {first.get('msg')} (input {str(first.get('input'))[:80]!r})"
    return f"{type(exc).__name__}: {exc}"
