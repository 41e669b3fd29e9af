"""``Bus``: what one service holds of the bus (consumers, publishers, dead letters, metrics).

faststream keeps what it is good at here: the broker and its publishers, and the AsyncAPI
document, which lists every subscription (each is registered with faststream for the document,
but never started: the consumers in ``ordered``/``competing`` read the streams themselves, in
batches, because faststream's per-message path was the cost: 2.9k events/s against 100k+).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from typing import Any, Awaitable, Callable

from faststream import AckPolicy
from faststream.redis import RedisBroker, StreamSub
from faststream.redis.annotations import RedisBatchStreamMessage, RedisStreamMessage

from libs.common import topics
from libs.common.bus.balance import PartitionBalancer
from libs.common.bus.competing import CompetingConsumer
from libs.common.bus.consuming import (
    BATCH,
    BLOCK_MS,
    EVENT,
    LIST,
    PLAIN,
    READ_BATCH,
    BatchProcessor,
    Stopped,
    Subscription,
    model_of,
)
from libs.common.bus.deadletters import DeadLetters
from libs.common.bus.failures import INFRASTRUCTURE, Stall, classify
from libs.common.bus.broadcast import BroadcastConsumer
from libs.common.bus.framing import DATA_FIELD, MAX_EVENT_BYTES, PlainJSONFormat, is_cluster_url, plain_url, redis_client
from libs.common.bus.groups import OwnerLease, check_partitions, ensure_group, remove_stale_consumers
from libs.common.bus.guard import OncePerCandle
from libs.common.bus.monitor import BusMetrics, GroupSampler
from libs.common.bus.ordered import OrderedOwner
from libs.common.contracts import DeadLetter, Event
from libs.common.telemetry import ServiceMetrics

log = logging.getLogger("klinebus.bus")

Handler = Callable[..., Awaitable[Any]]
Hook = Callable[[int], Awaitable[Any]]

OWNER_LEASE_MS = 5_000
MONITOR_INTERVAL_S = 15.0
STALE_CONSUMER_MS = 3_600_000
STOP_GRACE_S = 2.0


class Bus:
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
        owner_lease_ms: int = OWNER_LEASE_MS,
        stream_retention_ms: int = 0,
        stale_consumer_ms: int = STALE_CONSUMER_MS,
        monitor_interval_s: float = MONITOR_INTERVAL_S,
        max_event_bytes: int = MAX_EVENT_BYTES,
        partitions: int = 1,
    ) -> None:
        if not isinstance(partitions, int) or partitions < 1:
            raise ValueError(f"partitions must be an integer >= 1, got {partitions!r}")
        self.service = service
        self.partitions = partitions
        self.url = url
        self.consumer = consumer
        self.stream_maxlen = stream_maxlen
        self.dead_letter_maxlen = dead_letter_maxlen
        self.reclaim_idle_ms = reclaim_idle_ms
        self.polling_interval_ms = polling_interval_ms
        self.owner_lease_ms = owner_lease_ms
        self.stream_retention_ms = stream_retention_ms
        self.stale_consumer_ms = stale_consumer_ms
        self.monitor_interval_s = monitor_interval_s
        self.max_event_bytes = max_event_bytes
        self.metrics = metrics or ServiceMetrics(service)
        self.bus_metrics = BusMetrics(self.metrics.registry)
        self.subscriptions: list[Subscription] = []
        self._on_owner: list[Hook] = []
        self._on_release: list[Hook] = []
        self.broker = self._make_broker()
        self._publishers: dict[str, Any] = {}
        self.publisher(topics.DEAD_LETTERS, DeadLetter)
        self._client = redis_client(url, timeouts=True)  # guards, dead letters, admin (connects lazily)
        self.dead_letters = DeadLetters(service, self._client, dead_letter_maxlen, self.metrics)
        self._consumers: list[OrderedOwner | PartitionBalancer | CompetingConsumer | BroadcastConsumer] = []
        self._clients: list[Any] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopping = asyncio.Event()
        self.fatal: str | None = None
        self.on_fatal: Callable[[str], None] | None = None
        self.running = False

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
            owner_lease_ms=getattr(settings, "owner_lease_ms", OWNER_LEASE_MS),
            stream_retention_ms=getattr(settings, "stream_retention_ms", 0),
            stale_consumer_ms=getattr(settings, "stale_consumer_ms", STALE_CONSUMER_MS),
            max_event_bytes=getattr(settings, "max_event_bytes", MAX_EVENT_BYTES),
            partitions=getattr(settings, "partitions", 1),
        )

    def partition_of(self, symbol: str, interval: str) -> int:
        """The partition of a (symbol, interval) in this deployment (``topics.partition_of``)."""
        return topics.partition_of(symbol, interval, self.partitions)

    def owned_partitions(self) -> frozenset[int]:
        """The partitions this replica owns now (empty: a standby, or no ordered subscription)."""
        for c in self._consumers:
            if isinstance(c, PartitionBalancer):
                return c.owned()
            if isinstance(c, OrderedOwner):
                return frozenset({0}) if c.owner else frozenset()
        return frozenset()

    def _make_broker(self) -> RedisBroker:
        # faststream logs every message it handles at INFO: only warnings from it.
        fs_log = logging.getLogger(f"klinebus.{self.service}.faststream")
        fs_log.setLevel(max(logging.WARNING, fs_log.getEffectiveLevel()))
        common = dict(message_format=PlainJSONFormat, logger=fs_log)
        if is_cluster_url(self.url):
            from faststream.redis import RedisClusterBroker  # type: ignore[attr-defined]

            return RedisClusterBroker(plain_url(self.url), **common)
        return RedisBroker(self.url, **common)

    # --- consuming ---------------------------------------------------------------------

    def ordered(
        self, topic: str, model: type[Event], *, description: str = "", max_records: int = READ_BATCH
    ) -> Callable[[Handler], Handler]:
        """Ordered consumer (candle topics): decorate ``handler(event: model, entry_id: str)``.

        Entries reach the handler in stream order, one at a time (read in batches of
        ``max_records``, acknowledged once per batch). One replica owns the service's ordered groups (a lease);
        others wait as hot standbys. Failures: see ``libs.common.bus.failures``."""
        return self._ordered(topic, model, EVENT, description, max_records)

    def ordered_batch(
        self, topic: str, model: type[Event], *, description: str = "", max_records: int = READ_BATCH
    ) -> Callable[[Handler], Handler]:
        """``ordered`` for handlers that use a batch: ``handler(events: list[model], entry_ids:
        list[str])`` gets up to ``max_records`` consecutive entries in stream order. A batch that
        keeps failing with a domain error is handed over again one event at a time, so only the
        failing event is dead-lettered. The handler must be idempotent per event (a batch may be
        retried after a failure part-way; publish through ``once_per_candle``)."""
        return self._ordered(topic, model, BATCH, description, max_records)

    def _ordered(self, topic: str, model: type, kind: str, description: str, max_records: int):
        def decorate(handler: Handler) -> Handler:
            self.subscriptions.append(Subscription(topic, model, handler, kind, True, max_records, description))
            self._document(topic, model, handler.__name__, description, max_records)
            return handler

        return decorate

    def competing(
        self, topic: str, *, description: str = "", max_records: int = READ_BATCH
    ) -> Callable[[Handler], Handler]:
        """Competing consumers (work queues): replicas share the entries, in no particular order.

        The handler takes the event, faststream-style (``async def h(event: ChartRequest)``);
        entries a dead replica left pending are reclaimed after ``reclaim_idle_ms``."""

        def decorate(handler: Handler) -> Handler:
            self.subscriptions.append(Subscription(topic, model_of(handler), handler, PLAIN, False, max_records, description))
            self._doc(self._stream_sub(topic, max_records), topic, description, handler)
            return handler

        return decorate

    def competing_batch(
        self, topic: str, model: type[Event], *, max_records: int = 500, description: str = ""
    ) -> Callable[[Handler], Handler]:
        """Decorate ``handler(events: list[model])`` to consume ``topic`` up to ``max_records`` at a
        time (for handlers whose cost is per write, not per event: the archiver). Each entry is
        validated on its own, so one bad entry is dead-lettered without failing its batch."""

        def decorate(handler: Handler) -> Handler:
            self.subscriptions.append(Subscription(topic, model, handler, LIST, False, max_records, description))

            async def consume(msg: RedisBatchStreamMessage) -> None:  # for the document only
                return None

            consume.__name__ = handler.__name__
            self._doc(self._stream_sub(topic, max_records, batch=True), topic, description, consume)
            return handler

        return decorate

    def _stream_sub(self, topic: str, max_records: int, batch: bool = False) -> StreamSub:
        return StreamSub(
            topics.stream_key(topic), group=self.service, consumer=self.consumer, batch=batch,
            polling_interval=self.polling_interval_ms, max_records=max_records,
        )

    def _document(self, topic: str, model: type, name: str, description: str, max_records: int) -> None:
        """Register an ordered subscription with faststream so the AsyncAPI document lists it
        with ``model`` as its payload; it is never started."""

        async def consume(event: Any, msg: Any) -> None:
            return None

        consume.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [
                inspect.Parameter("event", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=model),
                inspect.Parameter("msg", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=RedisStreamMessage),
            ]
        )
        consume.__name__ = name
        self._doc(self._stream_sub(topic, max_records), topic, description, consume)

    def _doc(self, stream: StreamSub, topic: str, description: str, fn: Handler) -> None:
        sub = self.broker.subscriber(
            stream=stream, ack_policy=AckPolicy.NACK_ON_ERROR, title=f"{self.service}:{topic}",
            description=description or None,
        )
        sub(fn)

    def on_owner(self, fn: Hook) -> Hook:
        """``fn(partition)`` runs each time this replica takes a partition (with one partition: becomes the
        owner of its ordered groups), before any entry of it is handled (restore that partition's
        state here: a standby's state is stale by the time it takes over)."""
        self._on_owner.append(fn)
        return fn

    def on_release(self, fn: Hook) -> Hook:
        """``fn(partition)`` runs when this replica gives a partition up cleanly (a rebalance, a stop),
        after its last batch was acknowledged and before its lease is released (write that
        partition's checkpoint here; drop its keys' state). Not called when the lease was lost:
        that partition's state is stale and the next ``on_owner`` restores it anyway."""
        self._on_release.append(fn)
        return fn

    def broadcast(
        self, topic: str, model: type[Event], *, description: str = "", max_records: int = READ_BATCH,
        since: Callable[[], str | None] | None = None,
    ) -> Callable[[Handler], Handler]:
        """Every replica sees every entry (no consumer group): ``handler(event, entry_id)``, read
        with XREAD from the stream's end at start, the position kept in memory (for state every
        replica must hold: inference's models.v1). A failing entry is retried with back-off as
        any other, then dead-lettered (once per replica).

        ``since``: asked when the bus starts, after the start-up hooks, for the last entry the
        service's start-up already reflected (None: the stream's end); reading starts after it,
        so an entry appended while the start-up ran is not missed."""

        def decorate(handler: Handler) -> Handler:
            self.subscriptions.append(
                Subscription(topic, model, handler, EVENT, False, max_records, description, broadcast=True,
                             since=since))
            self._document(topic, model, handler.__name__, description, max_records)
            return handler

        return decorate

    # --- lifecycle -----------------------------------------------------------------------

    async def ensure_groups(self) -> None:
        """Create this service's consumer groups (idempotent): at the position it last
        acknowledged, or at the stream's start, so a service deployed after its producer still
        sees every retained event."""
        for sub in self.subscriptions:
            if sub.broadcast:
                continue
            for p in topics.partitions_of(sub.topic, self.partitions):
                await ensure_group(self._client, sub.topic, self.service, p)

    def _partitioned(self) -> bool:
        """Whether this bus touches a partitioned topic (then the recorded count must match)."""
        used = {s.topic for s in self.subscriptions} | set(self._publishers)
        return bool(used & topics.PARTITIONED)

    async def check_partitions(self) -> None:
        """Record the partition count if none is, or refuse to start on a different one."""
        if self._partitioned():
            await check_partitions(self._client, self.partitions)

    async def start(self) -> None:
        """Create groups, start the publishers and one consumer task per subscription. Returns
        once every ordered consumer owns its group and has handled what was left pending, or
        waits as a standby. Redis down or refusing writes at start is waited out (one line, the
        stalled gauge), not a crash loop."""
        await self._waiting_out("checking the partition count", self.check_partitions)
        await self._waiting_out("creating consumer groups", self.ensure_groups)
        ordered: dict[int, list[BatchProcessor]] = {}
        for sub in self.subscriptions:
            sub.decoder.max_bytes = self.max_event_bytes  # an oversized entry is refused unparsed
            for p in topics.partitions_of(sub.topic, self.partitions):
                client = redis_client(self.url, timeouts=True)  # its own: a blocking read holds a connection
                self._clients.append(client)
                proc = BatchProcessor(self.service, self.consumer, sub, client, self.dead_letters, self.metrics,
                                      self.bus_metrics, partition=p)
                proc.stopping = self._stopping
                if sub.broadcast:
                    self._consumers.append(BroadcastConsumer(proc))
                elif sub.ordered:
                    ordered.setdefault(p, []).append(proc)
                else:
                    self._consumers.append(CompetingConsumer(proc, self.reclaim_idle_ms))
        if ordered:
            self._consumers.insert(0, self._ordered_owner(ordered))
        await self._waiting_out("connecting the publishers", self._start_publishers)
        for consumer in self._consumers:
            if isinstance(consumer, BroadcastConsumer):
                await self._waiting_out("finding where to broadcast from", consumer.prepare)
        self.running = True
        for consumer in self._consumers:
            self._tasks.append(asyncio.create_task(self._supervise(consumer), name=consumer.name))
        if self.subscriptions:
            self._tasks.append(asyncio.create_task(self._monitor(), name=f"{self.service}:bus-monitor"))
        await self._settled()

    def _ordered_owner(self, ordered: dict[int, list[BatchProcessor]]) -> OrderedOwner | PartitionBalancer:
        """One lease per partition; the service's unpartitioned ordered subscriptions go with
        partition 0. With one partition (or none of the ordered topics partitioned): the one
        owner and hot standbys of old."""
        all_topics = [p.sub.topic for p in ordered[0]]
        gauges = {t: self.bus_metrics.owner.labels(self.service, t) for t in all_topics}

        def unit(p: int, procs: list[BatchProcessor]) -> OrderedOwner:
            topics_ = [proc.sub.topic for proc in procs]
            lease = OwnerLease(self._client, self.service, topics_, self.consumer, self.owner_lease_ms, partition=p)
            return OrderedOwner(self.service, procs, lease, self._on_owner, [gauges[t] for t in topics_],
                                partition=p, on_release=self._on_release)

        if len(ordered) == 1:
            return unit(0, ordered[0])
        units = [unit(p, ordered[p]) for p in sorted(ordered)]
        return PartitionBalancer(self.service, self.consumer, self._client, units, self.owner_lease_ms)

    async def _start_publishers(self) -> None:
        """``broker.start`` without the subscriptions: those faststream knows are for the AsyncAPI
        document only (the consumers here read the streams themselves), and starting one would
        create its group and consume. Public faststream API only: connect, then each publisher."""
        await self.broker.connect()
        for pub in self.broker.publishers:
            await pub.start()

    async def _waiting_out(self, doing: str, call: Hook) -> None:
        stall = Stall(f"{self.service}:start", lambda reason: self.bus_metrics.stalled.labels(self.service, "*", reason))
        while True:
            try:
                await call()
                stall.clear()
                return
            except Exception as exc:  # noqa: BLE001 - classified below
                if classify(exc) != INFRASTRUCTURE:
                    raise
                await stall.wait(exc, doing)

    async def _settled(self) -> None:
        for consumer, task in zip(self._consumers, self._tasks):
            if not isinstance(consumer, (OrderedOwner, PartitionBalancer)):
                continue
            settled = asyncio.ensure_future(consumer.settled.wait())
            await asyncio.wait([settled, task], return_when=asyncio.FIRST_COMPLETED)
            settled.cancel()
            if self.fatal:
                raise RuntimeError(f"{self.service}: {self.fatal}")

    async def _supervise(self, consumer: Any) -> None:
        ups = [self.bus_metrics.up.labels(self.service, t) for t in consumer.topics]
        for up in ups:
            up.set(1)
        try:
            await consumer.run()
        except Stopped:
            pass
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a dead consumer must fail /healthz loudly
            self.fatal = f"consumer of {', '.join(consumer.topics)} died: {type(exc).__name__}: {exc}"
            log.exception("%s: %s", self.service, self.fatal)
            if self.on_fatal is not None:
                self.on_fatal(self.fatal)
        finally:
            for up in ups:
                up.set(0)

    async def _monitor(self) -> None:
        samplers = [(GroupSampler(self.bus_metrics, sub.topic, self.service, self.partitions), sub.ordered)
                    for sub in self.subscriptions if not sub.broadcast]
        stopping = self._stopping
        while not stopping.is_set():
            for sampler, is_ordered in samplers:
                try:
                    await sampler.sample(self._client)
                    owned = self.owned_partitions()
                    for p in topics.partitions_of(sampler.topic, self.partitions):
                        if is_ordered and p not in owned:
                            continue  # a partition's consumers are its owner's to clean up
                        removed = await remove_stale_consumers(
                            self._client, sampler.topic, self.service, self.consumer, self.stale_consumer_ms, p
                        )
                        if removed:
                            self.bus_metrics.stale_removed.labels(sampler.topic, self.service).inc(len(removed))
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - monitoring must not take the service down
                    log.debug("%s: sampling %s failed: %s", self.service, sampler.topic, exc)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stopping.wait(), self.monitor_interval_s)

    def alive(self) -> bool:
        """Every consumer task runs (for /healthz and /readyz)."""
        return self.fatal is None and all(not t.done() for t in self._tasks) if self.running else False

    def ready(self) -> bool:
        """Alive, and each ordered consumer either owns its group and has recovered, or is a standby."""
        return self.alive()

    def owns_all(self) -> bool:
        """Owns every partition of its ordered groups (one partition: is the owner)."""
        for c in self._consumers:
            if isinstance(c, PartitionBalancer):
                return len(c.owned()) == len(c.units)
            if isinstance(c, OrderedOwner):
                return c.owner
        return True

    async def stop(self) -> None:
        self.running = False
        self._stopping.set()
        if self._tasks:
            # Consumers finish the batch in hand and end before their next read (at most one
            # BLOCK_MS away); only what still runs after that is cancelled.
            _, left = await asyncio.wait(self._tasks, timeout=BLOCK_MS / 1000 + STOP_GRACE_S)
            for task in left:
                task.cancel()
            if left:
                _, stuck = await asyncio.wait(left, timeout=STOP_GRACE_S)
                for client in self._clients:  # a read that ignores its cancellation: cut its socket
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(client.connection_pool.disconnect(), STOP_GRACE_S)
                if stuck:
                    await asyncio.wait(stuck, timeout=STOP_GRACE_S)
        self._tasks.clear()
        self._stopping = asyncio.Event()
        for consumer in self._consumers:
            if isinstance(consumer, (OrderedOwner, PartitionBalancer)):
                await consumer.release()
        self._consumers.clear()
        # Stopping the documentation-only subscriptions is a no-op (they never started); stop
        # also closes the publishers' connection.
        await self.broker.stop()
        for client in self._clients:
            with contextlib.suppress(Exception):
                await client.aclose()
        self._clients.clear()
        with contextlib.suppress(Exception):
            await self._client.aclose()

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
        """Append ``event`` to its topic; an event of a partitioned topic goes to its key's partition."""
        pub = self._publishers.get(event.topic)
        if pub is None:
            raise KeyError(f"{self.service} has no publisher for {event.topic}; declare it with Bus.publisher")
        p = self.partition_of(event.symbol, event.interval) if event.topic in topics.PARTITIONED else 0  # type: ignore[attr-defined]
        if p:
            # faststream's publisher is bound to partition 0's stream; the entry is the same one
            # field of JSON (framing.PlainJSONFormat).
            await self._client.xadd(topics.stream_key(event.topic, p), {DATA_FIELD: event.to_json()},
                                    maxlen=self.stream_maxlen, approximate=True)
        else:
            await pub.publish(event.model_dump(mode="json"))
        self.metrics.events_out.labels(event.topic).inc()

    def once_per_candle(self, topic: str, client: Any) -> OncePerCandle:
        """A publisher for a candle-keyed topic that never appends a (symbol, interval, open_time) twice.
        The topic must also be declared with ``publisher`` so it appears in the AsyncAPI document."""
        if topic not in self._publishers:
            raise KeyError(f"{self.service} has no publisher for {topic}; declare it with Bus.publisher")
        return OncePerCandle(client, topic, self.stream_maxlen, self.metrics, retention_ms=self.stream_retention_ms,
                             partitions=self.partitions)

    async def dead_letter(self, source: str, raw: Any, reason: str) -> None:
        """Write a dead letter now (raises if Redis refuses it)."""
        await self.dead_letters.write(source, raw, reason)
