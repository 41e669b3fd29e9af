"""The thin bus edge: a faststream RedisBroker with our conventions.

* Every topic is one Redis stream, read through a consumer group named after
  the consuming service (XREADGROUP + XACK). Groups are created at the start
  of the stream (id 0), so a service deployed after its producer still sees
  every retained event.
* Candle topics are consumed in order (``ordered``): one entry at a time,
  a failing handler retried in place so nothing overtakes it, and at start
  every entry still pending in the group (a crashed replica's, or this one's)
  handled first, oldest first (``recover``). Order per symbol is what the
  indicator state needs; one replica per ordered group keeps it.
* Competing consumers (``competing``, ``competing_batch``: work queues, the archiver) keep a schema-hidden reclaimer
  (XAUTOCLAIM after ``reclaim_idle_ms``) for entries a dead replica left.
* Every publish caps its stream (XADD MAXLEN ~).
* A message a handler cannot use goes to ``dead-letters.v1`` with the reason,
  the counter ``klinebus_<service>_dead_letters_total`` goes up, one log line
  says why, and the entry is acknowledged: bad input never blocks a stream.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from typing import Any, Awaitable, Callable, Sequence

import redis.asyncio as aioredis
from faststream import AckPolicy, BaseMiddleware
from faststream.redis import RedisBroker, StreamSub
from faststream.redis.annotations import RedisBatchStreamMessage, RedisStreamMessage
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
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


# Ordered handlers: how many times a failing (non-infrastructure) handler is tried before its
# entry is dead-lettered, and the retry back-off.
HANDLER_ATTEMPTS = 5
RETRY_FIRST_S = 0.1
RETRY_MAX_S = 5.0
# Entries read per XREADGROUP: bounds what a stopping replica leaves pending.
READ_BATCH = 100
INFRASTRUCTURE_ERRORS: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError, OSError)
Handler = Callable[[Any, str], Awaitable[Any]]


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


# KEYS[1] stream, KEYS[2] last-open-time hash; ARGV: field, open_time, payload, maxlen, data field.
# Returns {1, open_time} when appended, {0, last} when the candle is not newer than the last one.
_PUBLISH_ONCE = """
local last = redis.call('HGET', KEYS[2], ARGV[1])
if last and tonumber(last) >= tonumber(ARGV[2]) then
  return {0, tonumber(last)}
end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*', ARGV[5], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return {1, tonumber(ARGV[2])}
"""
# The same guard for many events in one call: ARGV maxlen, data field, then (field, open_time,
# payload) per event, applied in order; returns one {appended, last} pair per event.
_PUBLISH_ONCE_MANY = """
local out = {}
for i = 3, #ARGV, 3 do
  local last = redis.call('HGET', KEYS[2], ARGV[i])
  if last and tonumber(last) >= tonumber(ARGV[i + 1]) then
    out[#out + 1] = {0, tonumber(last)}
  else
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', ARGV[2], ARGV[i + 2])
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
    out[#out + 1] = {1, tonumber(ARGV[i + 1])}
  end
end
return out
"""
LAST_OPEN_TIME = "last-open-time"


def candle_field(symbol: str, interval: str, *more: str) -> str:
    return "|".join((symbol, interval, *more))


class OncePerCandle:
    """Appends a candle-keyed event to its topic only if it is newer than the last one appended
    for its (symbol, interval): one atomic Lua step, so re-deliveries, replays, replicas and a crash
    between publish and ack never put a candle on a stream twice, nor behind a later one.

    The last open_time per (symbol, interval) lives in a hash beside the stream (same cluster
    slot), so the guard survives restarts and is shared by replicas.

    With ``metrics``, each publish counts ``events_out_total`` (appended) or ``duplicates_total``
    (refused) for the topic.
    """

    def __init__(self, client: aioredis.Redis, topic: str, maxlen: int, metrics: ServiceMetrics | None = None) -> None:
        self.client = client
        self.topic = topic
        self.maxlen = maxlen
        self.metrics = metrics
        self._last_tried: dict[str, Any] = {}  # per stream field: the last event handed to publish
        self.stream = topics.stream_key(topic)
        self.last_key = topics.stream_companion_key(topic, LAST_OPEN_TIME)
        self._script = client.register_script(_PUBLISH_ONCE)
        self._script_many = client.register_script(_PUBLISH_ONCE_MANY)

    async def publish(self, event: Any, *key_more: str) -> tuple[bool, int]:
        """``(appended, last_open_time)``; the event must have symbol, interval and open_time.
        ``key_more`` widens the identity (e.g. the model name on predictions.v1)."""
        field = candle_field(event.symbol, event.interval, *key_more)
        self._last_tried[field] = event
        appended, last = await self._append(field, event)
        if self.metrics is not None:
            (self.metrics.events_out if appended else self.metrics.duplicates).labels(self.topic).inc()
        return appended, last

    async def _append(self, field: str, event: Any) -> tuple[bool, int]:
        appended, last = await self._script(
            keys=[self.stream, self.last_key],
            args=[field, event.open_time, event.to_json(), self.maxlen, DATA_FIELD],
        )
        return bool(appended), int(last)

    async def retry_last(self, symbol: str, interval: str, open_time: int, *key_more: str) -> bool:
        """For a handler whose state took a candle before its publish failed: when the candle at
        ``open_time`` is the last event tried for this stream, publish it again (the guard keeps it
        once) and return True; otherwise False (a plain re-delivery: nothing to do)."""
        event = self._last_tried.get(candle_field(symbol, interval, *key_more))
        if event is None or event.open_time != open_time:
            return False
        await self.publish(event, *key_more)
        return True

    async def publish_many(self, events: Sequence[Any], *key_more: str) -> list[tuple[bool, int]]:
        """``publish`` for many events in one round trip (a backfill page): same guard, applied
        in the given order, one ``(appended, last_open_time)`` per event."""
        if not events:
            return []
        args: list[Any] = [self.maxlen, DATA_FIELD]
        for e in events:
            args += (candle_field(e.symbol, e.interval, *key_more), e.open_time, e.to_json())
        replies = await self._script_many(keys=[self.stream, self.last_key], args=args)
        return [(bool(appended), int(last)) for appended, last in replies]

    async def last_open_times(self) -> dict[tuple[str, str], int]:
        raw = await self.client.hgetall(self.last_key)
        out = {}
        for f, v in raw.items():
            symbol, interval = (f.decode() if isinstance(f, bytes) else f).split("|")[:2]
            out[(symbol, interval)] = max(int(v), out.get((symbol, interval), 0))
        return out


class Bus:
    """What one service holds of the bus: its broker, publishers, dead letters and metrics."""

    def __init__(
        self,
        service: str,
        url: str,
        *,
        consumer: str,
        stream_maxlen: int = 200_000,
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
        self._ordered: list[tuple[str, type[Event], Handler]] = []
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

    def ordered(
        self, topic: str, model: type[Event], *, description: str = "", max_records: int = READ_BATCH
    ) -> Callable[[Handler], Any]:
        """Ordered consumer (candle topics): decorate ``handler(event: model, entry_id: str)``.

        Entries reach the handler in stream order, one at a time. A failure that is not bad input
        is retried in place (so nothing overtakes it); at start, before new entries, ``recover``
        hands the handler every entry still pending in this group (this consumer's and a dead
        replica's), oldest first. One replica per ordered group."""
        key = topics.stream_key(topic)
        self._groups.append(key)

        def decorate(handler: Handler) -> Any:
            async def consume(event: Any, msg: RedisStreamMessage) -> None:
                await self._handle(topic, handler, event, msg.raw_message["message_ids"][0].decode(), msg.body)

            # faststream reads the payload type from the signature: the AsyncAPI document shows ``model``.
            consume.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
                [
                    inspect.Parameter("event", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=model),
                    inspect.Parameter("msg", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=RedisStreamMessage),
                ]
            )
            consume.__name__ = handler.__name__
            self._ordered.append((topic, model, handler))
            return self.broker.subscriber(
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
            )(consume)

        return decorate

    def competing(
        self, topic: str, *, description: str = "", max_records: int = READ_BATCH
    ) -> Callable[[Any], Any]:
        """Competing consumers (work queues): replicas share the entries, in no particular order.

        The handler takes faststream's own arguments (e.g. ``event: ChartRequest``); entries a dead
        replica left pending are reclaimed after ``reclaim_idle_ms`` by a schema-hidden subscriber."""
        key = topics.stream_key(topic)
        self._groups.append(key)
        return self._unordered(topic, key, description, max_records)

    def _unordered(
        self, topic: str, key: str, description: str, max_records: int, batch: bool = False
    ) -> Callable[[Any], Any]:
        """A live subscriber plus a schema-hidden reclaimer of what a dead replica left pending."""
        live = self.broker.subscriber(
            stream=StreamSub(
                key, group=self.service, consumer=self.consumer, batch=batch,
                polling_interval=self.polling_interval_ms, max_records=max_records,
            ),
            ack_policy=AckPolicy.NACK_ON_ERROR,
            title=f"{self.service}:{topic}",
            description=description or None,
        )
        reclaim = self.broker.subscriber(
            stream=StreamSub(
                key, group=self.service, consumer=self.consumer, batch=batch,
                min_idle_time=self.reclaim_idle_ms, polling_interval=max(self.reclaim_idle_ms // 4, 1000),
            ),
            ack_policy=AckPolicy.NACK_ON_ERROR,
            include_in_schema=False,
        )
        return lambda handler: live(reclaim(handler))

    async def _handle(self, topic: str, handler: Handler, event: Any, entry_id: str, raw: Any) -> None:
        """Run ``handler`` until it succeeds. Redis or network trouble is waited out (nothing else can
        progress meanwhile); any other error is retried a few times, then the entry is dead-lettered
        with the reason, so a bug shows as a dead letter instead of a stuck stream."""
        attempt = 0
        while True:
            try:
                await handler(event, entry_id)
                return
            except BAD_INPUT_ERRORS:
                raise  # the middleware (live) or ``recover`` dead-letters it
            except INFRASTRUCTURE_ERRORS as exc:
                reason = f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # noqa: BLE001 - counted, retried, then dead-lettered
                attempt += 1
                reason = f"{type(exc).__name__}: {exc}"
                if attempt >= HANDLER_ATTEMPTS:
                    log.exception("%s: %s %s failed %d times; dead-lettering it", self.service, topic, entry_id, attempt)
                    await self.dead_letter(topic, raw, f"handler failed {attempt} times: {reason}")
                    return
            self.metrics.retries.labels(topic).inc()
            delay = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** min(attempt, 10))
            log.warning("%s: %s %s: %s; retrying in %.1fs", self.service, topic, entry_id, reason, delay)
            await asyncio.sleep(delay)

    async def recover(self) -> int:
        """Before consuming new entries: take over every entry pending in this service's groups
        (a crashed or replaced replica's, and this consumer's own) and handle them oldest first.
        Returns how many were handled."""
        if not self._ordered:
            return 0
        client = redis_client(self.url)
        handled = 0
        try:
            for topic, model, handler in self._ordered:
                key = topics.stream_key(topic)
                start = "0-0"
                while True:  # ordered groups have one live consumer: whatever is pending is ours now
                    # (redis-py drops the cursor with justid=True, so the entries come along)
                    reply = await client.xautoclaim(
                        key, self.service, self.consumer, min_idle_time=0, start_id=start, count=READ_BATCH
                    )
                    start = reply[0].decode() if isinstance(reply[0], bytes) else reply[0]
                    if start == "0-0":
                        break
                after = "0"
                while True:
                    reply = await client.xreadgroup(self.service, self.consumer, {key: after}, count=READ_BATCH)
                    entries = reply[0][1] if reply else []
                    if not entries:
                        break
                    for entry_id, fields in entries:
                        eid = after = entry_id.decode()
                        raw = (fields or {}).get(DATA_FIELD.encode())
                        if raw is not None:
                            try:
                                await self._handle(topic, handler, model.from_json(raw), eid, raw)
                            except BAD_INPUT_ERRORS as exc:
                                await self.dead_letter(topic, raw, _one_line(exc))
                        await client.xack(key, self.service, eid)  # a trimmed entry (no fields) is acked too
                        handled += 1
        finally:
            await client.aclose()
        if handled:
            log.info("%s: handled %d entries left pending before the start", self.service, handled)
        return handled

    def competing_batch(
        self, topic: str, model: type[Event], *, max_records: int = 500, description: str = ""
    ) -> Callable[[Callable[[list[Any]], Awaitable[Any]]], Any]:
        """Decorate ``handler(events: list[model])`` to consume ``topic`` up to ``max_records`` at a
        time (for handlers whose cost is per write, not per event: the archiver). Each entry is
        validated on its own, so one bad entry is dead-lettered without failing its batch."""
        key = topics.stream_key(topic)
        self._groups.append(key)

        def decorate(handler: Callable[[list[Any]], Awaitable[Any]]) -> Any:
            async def consume(msg: RedisBatchStreamMessage) -> None:
                events = []
                for fields in msg.raw_message["data"]:
                    raw = fields.get(DATA_FIELD.encode(), b"")
                    try:
                        events.append(model.from_json(raw))
                    except BAD_INPUT_ERRORS as exc:
                        await self.dead_letter(topic, raw, _one_line(exc))
                self.metrics.events_in.labels(topic).inc(len(msg.raw_message["data"]))
                if events:
                    await handler(events)

            consume.__name__ = handler.__name__
            return self._unordered(topic, key, description, max_records, batch=True)(consume)

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

    def once_per_candle(self, topic: str, client: aioredis.Redis) -> OncePerCandle:
        """A publisher for a candle-keyed topic that never appends a (symbol, interval, open_time) twice.
        The topic must also be declared with ``publisher`` so it appears in the AsyncAPI document."""
        if topic not in self._publishers:
            raise KeyError(f"{self.service} has no publisher for {topic}; declare it with Bus.publisher")
        return OncePerCandle(client, topic, self.stream_maxlen, self.metrics)

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
