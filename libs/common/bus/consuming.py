"""What ordered and competing consumers share: one subscription's batch of entries, decoded,
handed to the handler with failures classified (``failures``), dead letters written before their
entries are acknowledged, and one fenced XACK per batch.

This is the hot path. faststream's per-message subscriber cost ~320 us of CPU per event (one XACK
round trip per entry, a worker-thread hop to resolve arguments, a deep copy of the log context,
~10 event-loop turns); here a batch of up to ``max_records`` entries costs one XREADGROUP, one
pydantic call, one handler call (batch handlers) and one XACK.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import typing
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import redis.asyncio as aioredis
from redis.exceptions import WatchError

from libs.common import topics
from libs.common.bus import failures
from libs.common.bus.deadletters import DeadLetters
from libs.common.bus.failures import BAD_INPUT, BUG, INFRASTRUCTURE, Stall, classify, last_line
from libs.common.bus.framing import Decoder, entry_id_key, one_line, payload_of_fields
from libs.common.bus.groups import Acker, LeaseLost, ensure_group, lease_key
from libs.common.bus.monitor import BusMetrics
from libs.common.telemetry import ServiceMetrics

log = logging.getLogger("klinebus.bus")

# Entries per XREADGROUP (and so per handler batch and per XACK). 1000 keeps one Lua XACK well
# inside Lua's argument limits and a batch's handling to milliseconds.
READ_BATCH = 1000
# How long one XREADGROUP waits for new entries before the loop looks around (stop, lease).
BLOCK_MS = 1000

EVENT = "event"  # ordered: handler(event, entry_id)
BATCH = "batch"  # ordered_batch: handler(events, entry_ids)
PLAIN = "plain"  # competing: handler(event)  (faststream style)
LIST = "list"  # competing_batch: handler(events)


@dataclass
class Subscription:
    topic: str
    model: type
    handler: Callable[..., Awaitable[Any]]
    kind: str
    ordered: bool
    max_records: int = READ_BATCH
    description: str = ""
    broadcast: bool = False  # every replica reads every entry (XREAD, no group): ``Bus.broadcast``
    since: Callable[[], str | None] | None = None  # a broadcast's first position (``Bus.broadcast``)
    decoder: Decoder = field(init=False)

    def __post_init__(self) -> None:
        self.decoder = Decoder(self.model)
        self.key = topics.stream_key(self.topic)

    @property
    def batched(self) -> bool:
        return self.kind in (BATCH, LIST)

    async def call(self, events: list[Any], ids: list[str]) -> None:
        if self.kind == BATCH:
            await self.handler(events, ids)
        elif self.kind == LIST:
            await self.handler(events)
        elif self.kind == EVENT:
            await self.handler(events[0], ids[0])
        else:
            await self.handler(events[0])


def entries_of_reply(response: Any, **_options: Any) -> list[tuple[bytes, list | None]]:
    """XREADGROUP's reply as ``[(entry_id, [field, value, ...] | None), ...]``.

    redis-py's own parser builds a dict per entry (~1.3 us each, a third of a raw read); the
    consumer only needs ``__data__``, usually the first field. ``None`` fields: a pending entry
    the stream no longer holds (trimmed). Shapes: RESP2 ``[[stream, [[id, fields], ...]]]``,
    RESP3 ``{stream: [[id, fields], ...]}``.
    """
    if not response:
        return []
    out: list[tuple[bytes, list | None]] = []
    for entries in response.values() if isinstance(response, dict) else (e for _, e in response):
        out += entries
    return out


# The cluster client's form of an owner's fenced read (the standalone one is a WATCH transaction,
# ``BatchProcessor._owner_read``: converting 1000 entries to Lua tables and back costs Redis
# ~4 ms a batch, 3x the read itself). KEYS[1] stream, KEYS[2] the group's fence key; ARGV:
# token, group, consumer, count, start id. Returns -1 when the token is not the fence's (a deposed owner:
# nothing is handed over), {1, entries} (``[[id, [field, value, ...] | nil], ...]``: nil for a
# pending entry the stream no longer holds), or {0, the group's last delivered id} when there is
# nothing to read. The fence is checked where the entries are handed over, in one step: a read a
# deposed owner sent before a pause or a partition and that reaches Redis after a takeover finds
# the new owner's token and takes nothing.
_FENCED_READ = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return -1
end
local r = redis.call('XREADGROUP', 'GROUP', ARGV[2], ARGV[3], 'COUNT', ARGV[4], 'STREAMS', KEYS[1], ARGV[5])
if r then
  return {1, r[1][2]}
end
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local name, last = nil, nil
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then last = g[i + 1] end
  end
  if name == ARGV[2] then
    return {0, last}
  end
end
return {0, '0-0'}
"""


def model_of(handler: Callable[..., Any]) -> type:
    """The payload model of a faststream-style handler: its first parameter's annotation."""
    hints = typing.get_type_hints(handler)
    params = list(inspect.signature(handler).parameters)
    if not params or params[0] not in hints:
        raise TypeError(f"{handler.__name__}: annotate the first parameter with the event model")
    return hints[params[0]]


class Stopped(Exception):
    """The bus is stopping: the consumer loop ends between batches (cancelling a blocked redis-py
    read can leave its connection's clean-up waiting forever, so reads are not cancelled)."""


class BatchProcessor:
    """Handles one subscription's batches; see the module docstring."""

    def __init__(
        self,
        service: str,
        consumer: str,
        sub: Subscription,
        client: aioredis.Redis,
        dead_letters: DeadLetters,
        metrics: ServiceMetrics,
        bus_metrics: BusMetrics,
        partition: int = 0,
    ) -> None:
        self.service, self.consumer, self.sub, self.client = service, consumer, sub, client
        self.partition = partition
        self.key = topics.stream_key(sub.topic, partition)
        self.dead_letters = dead_letters
        self.metrics = metrics
        self.bus_metrics = bus_metrics
        self.acker = Acker(client, sub.topic, service, partition)
        self.stall = Stall(f"{service}:{sub.topic}", lambda reason: bus_metrics.stalled.labels(service, sub.topic, reason))
        self.token = ""  # the lease token of an ordered owner; '' for competing groups
        self.fence: Callable[[], bool] = lambda: True  # False: our lease may be gone, stop
        self.stopping: asyncio.Event | None = None  # set by Bus.stop
        self._consumed = bus_metrics.consumed.labels(service, sub.topic)
        self._retries = metrics.retries.labels(sub.topic)
        # This client is the subscription's own: only its reads go through this parser.
        client.set_response_callback("XREADGROUP", entries_of_reply)
        self._read_script = client.register_script(_FENCED_READ)
        self._fence_key = lease_key(sub.topic, service, partition)
        self._seen = "0-0"  # the highest entry id a read returned to this consumer
        self._unsure = False  # a read of new entries whose reply never came (see ``read``)
        self._cluster = not isinstance(client, aioredis.Redis)

    # --- a batch -----------------------------------------------------------------------

    async def process(self, entries: list[tuple[Any, Any]]) -> int:
        """Handle entries read from the group (``read``: ``(id, [field, value, ...] | None)``),
        then acknowledge them all. Returns how many were handed to the handler."""
        ids = [i.decode() if isinstance(i, bytes) else i for i, _ in entries]
        raws = [payload_of_fields(fields) for _, fields in entries]
        # A pending entry the stream no longer holds comes back without fields (None); a real
        # entry always has one.
        gone = [i for i, (_, fields) in enumerate(entries) if not fields]
        if gone:
            self._trimmed([ids[i] for i in gone])
        events, bad = self.sub.decoder.many(raws)
        for i in bad:
            if entries[i][1]:  # a trimmed entry has nothing to dead-letter
                await self.dead_letter(raws[i], bad[i])
        good = [i for i in range(len(entries)) if i not in bad] if bad else range(len(entries))
        evs = [events[i] for i in good]
        gids = [ids[i] for i in good]
        if evs:
            await self.handle(evs, gids, [raws[i] for i in good])
        await self.ack(ids)
        self._consumed.inc(len(evs))
        return len(evs)

    def _trimmed(self, ids: list[str]) -> None:
        self.bus_metrics.trimmed.labels(self.sub.topic, self.service).inc(len(ids))
        log.error(
            "%s: %d pending entries of %s were trimmed before they were handled (%s .. %s); raise "
            "stream_maxlen / retention", self.service, len(ids), self.sub.topic, ids[0], ids[-1],
        )

    async def handle(self, events: list[Any], ids: list[str], raws: list[Any]) -> None:
        if self.sub.batched:
            outcome = await self.attempt(events, ids)
            if outcome is None:
                return
            # Some event of the batch fails: find it by handing them over one at a time.
            log.warning("%s: a batch of %d on %s failed (%s); retrying it event by event",
                        self.service, len(events), self.sub.topic, outcome[1])
        for event, entry_id, raw in zip(events, ids, raws):
            outcome = await self.attempt([event], [entry_id])
            if outcome is not None:
                kind, reason = outcome
                await self.dead_letter(raw, reason)

    async def attempt(self, events: list[Any], ids: list[str]) -> tuple[str, str] | None:
        """Call the handler until it succeeds (None), or return ``(kind, reason)`` for an entry
        to dead-letter: bad input at once, a domain error after ``HANDLER_ATTEMPTS`` tries.
        Infrastructure failures are waited out here, however long they last."""
        tries = 0
        while True:
            if not self.fence():
                raise LeaseLost(f"{self.service}: lease on {self.sub.topic} expired while handling")
            try:
                await self.sub.call(events, ids)
                if self.stall.stalled:
                    self.stall.clear()
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("%s: handled %d of %s up to %s", self.service, len(ids), self.sub.topic, ids[-1])
                return None
            except (asyncio.CancelledError, LeaseLost):
                raise
            except Exception as exc:  # noqa: BLE001 - classified below
                kind = classify(exc)
                if kind == BAD_INPUT:
                    return BAD_INPUT, one_line(exc)
                if kind == INFRASTRUCTURE:
                    self._retries.inc()
                    await self.stall.wait(exc, f"handling {self.sub.topic} {ids[0]}")
                    continue
                tries += 1
                self._retries.inc()
                if tries >= failures.HANDLER_ATTEMPTS:
                    if len(ids) == 1:
                        log.error("%s: %s %s failed %d times; dead-lettering it", self.service, self.sub.topic,
                                  ids[0], tries, exc_info=exc)
                    return BUG, f"handler failed {tries} times: {last_line(exc)}"
                delay = min(failures.RETRY_MAX_S, failures.RETRY_FIRST_S * 2 ** (tries - 1))
                log.warning("%s: %s %s: %s; retrying in %.2fs", self.service, self.sub.topic, ids[0],
                            " ".join(str(exc).split())[:200], delay)
                await asyncio.sleep(delay)

    async def dead_letter(self, raw: Any, reason: str) -> None:
        """Write the dead letter; an entry is acknowledged only after its letter is written, so
        a failing write (Redis refusing writes) is waited out like any infrastructure failure."""
        while True:
            try:
                await self.dead_letters.write(self.sub.topic, raw, reason)
                if self.stall.stalled:
                    self.stall.clear()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - never ack a letter we failed to write
                await self.stall.wait(exc, "writing a dead letter")

    async def ack(self, ids: list[str]) -> None:
        await self.redis("acknowledging", lambda: self.acker.ack(ids, self.token))

    async def redis(self, doing: str, call: Callable[[], Awaitable[Any]]) -> Any:
        """Run one Redis call until it succeeds: a lost group is recreated, infrastructure
        failures are waited out; anything else (a bad command: our bug) is raised."""
        while True:
            try:
                result = await call()
                if self.stall.stalled:
                    self.stall.clear()
                return result
            except (asyncio.CancelledError, LeaseLost):
                raise
            except Exception as exc:  # noqa: BLE001 - classified below
                if "NOGROUP" in str(exc):
                    await self.recreate_group()
                    continue
                if classify(exc) != INFRASTRUCTURE:
                    raise
                await self.stall.wait(exc, doing)
                if not self.fence():
                    raise LeaseLost(f"{self.service}: lease on {self.sub.topic} expired while {doing}") from None

    async def recreate_group(self) -> None:
        """The group vanished under us: recreate it where this service last acknowledged."""
        while True:
            try:
                at = await ensure_group(self.client, self.sub.topic, self.service, self.partition)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                if classify(exc) != INFRASTRUCTURE:
                    raise
                await self.stall.wait(exc, "recreating the consumer group")
        if at is not None:
            self.bus_metrics.recreated.labels(self.sub.topic, self.service).inc()
            log.error("%s: consumer group on %s was gone (NOGROUP); recreated at %s, the last position "
                      "it acknowledged", self.service, self.sub.topic, at)

    # --- the live loop -------------------------------------------------------------------

    async def pump(self, block: int, between: Callable[[], Awaitable[None]], may_read_ahead: Callable[[], bool]) -> None:
        """Read, handle and acknowledge new entries until stopped. ``between`` runs after every
        batch (a lease check, a reclaim round).

        When a read returns a full batch there is a backlog: the next batch is requested before
        this one is handled, so Redis builds the next reply on its core while this one is
        decoded and handled on ours. Order is unchanged: batches are still handled one after the
        other, and an entry read ahead is pending on this consumer, so a crash or a lost lease
        leaves it to recovery like any other. ``between`` waits while a read-ahead is in flight
        (the handler's own fence still checks the lease before every call); ``may_read_ahead``
        False (a reclaim is due: it reads this consumer's pending entries itself, and would hand
        a read-ahead batch over twice) lets it run after the next batch."""
        entries = await self.read(">", block)
        while True:
            ahead: asyncio.Future | None = None
            if len(entries) >= self.sub.max_records and may_read_ahead():
                ahead = asyncio.ensure_future(self.read(">", None))
            try:
                if entries:
                    await self.process(entries)
                if ahead is None:  # with a read-ahead in flight, the next batch comes first
                    await between()
            except BaseException:
                if ahead is not None:
                    await _settle(ahead)
                raise
            entries = await ahead if ahead is not None else await self.read(">", block)

    # --- reads -------------------------------------------------------------------------

    async def read(self, start: str, block: int | None) -> list[tuple[Any, Any]]:
        """Entries of the group for this consumer (``>``: new ones; an id: its pending ones after
        it). Infrastructure failures and a lost group are waited out / repaired (``redis``).

        A competing consumer reads with a plain (blocking) XREADGROUP. An ordered owner's reads
        are fenced where the entries are handed over (``_owner_read``): a read a deposed owner
        sent before a pause or a partition, reaching Redis after a standby took over, takes
        nothing. With nothing new it waits, with a plain XREAD that hands nothing over, for an
        entry after the last one the group delivered, then reads once more.

        A read of new entries whose reply never came (Redis killed after running it, a
        connection cut) may have handed entries over: they are pending on this consumer but
        were never seen. Until a read of new entries has returned, the next one first reads this
        consumer's pending entries after the last id it saw, which are exactly those (and older
        than anything new, so order holds)."""
        self._check_running()
        if not self.token:
            return await self.redis("reading", lambda: self._read_once(start, block, self._plain_read))
        entries, last = await self.redis("reading", lambda: self._read_once(start, None, self._owner_read))
        if entries or not block or start != ">":
            return entries
        await self.redis("waiting for entries", lambda: self.client.xread({self.key: last}, count=1, block=block))
        self._check_running()
        return (await self.redis("reading", lambda: self._read_once(start, None, self._owner_read)))[0]

    async def _read_once(self, start: str, block: int | None, how: Callable[..., Awaitable[Any]]) -> Any:
        while True:
            try:
                if start == ">" and self._unsure:
                    reply = await how(self._seen, None)
                    if _entries(reply):
                        self._note(reply)
                        return reply
                    self._unsure = False
                self._unsure = start == ">"  # until this read's reply is in: it may hand entries over
                reply = await how(start, block)
                self._unsure = False
                self._note(reply)
                return reply
            except WatchError:
                # The fence key was touched (our own renewal), or the connection dropped while
                # watching (redis-py reports that as a WatchError too): look again.
                continue

    def _note(self, reply: Any) -> None:
        entries = _entries(reply)
        if entries:
            last = _s(entries[-1][0])
            if entry_id_key(last) > entry_id_key(self._seen):
                self._seen = last

    async def _plain_read(self, start: str, block: int | None) -> list:
        return await self.client.xreadgroup(
            self.service, self.consumer, {self.key: start}, count=self.sub.max_records, block=block
        )

    def _check_running(self) -> None:
        if self.stopping is not None and self.stopping.is_set():
            raise Stopped
        # Our own clock first: a lease that may be gone is not used (Redis has the last word).
        if not self.fence():
            raise LeaseLost(f"{self.service}: lease on {self.sub.topic} expired before reading")

    async def _owner_read(self, start: str, _block: None = None) -> tuple[list, str]:
        """``(entries, "")``, or ``([], the group's last delivered id)``; LeaseLost when the fence
        holds another owner's token."""
        if self._cluster:
            reply = await self._read_script(
                keys=[self.key, self._fence_key], args=[self.token, self.service, self.consumer,
                                                            self.sub.max_records, start])
            if reply == -1:
                raise LeaseLost(f"{self.service}: {self.sub.topic}'s group has another owner")
            found, body = reply
            return (body, "") if found else ([], _s(body))
        return await self._watched_read(start)

    async def _watched_read(self, start: str) -> tuple[list, str]:
        # WATCH the fence, check it, then XREADGROUP in MULTI/EXEC: a new owner writing its token
        # in between makes EXEC hand nothing over (WatchError, which ``_read_once`` answers by
        # looking again: our own renewals touch the fence too, its expiry).
        async with self.client.pipeline(transaction=True) as pipe:
            await pipe.watch(self._fence_key)
            if _s(await pipe.get(self._fence_key)) != self.token:
                raise LeaseLost(f"{self.service}: {self.sub.topic}'s group has another owner")
            pipe.multi()
            pipe.xreadgroup(self.service, self.consumer, {self.key: start}, count=self.sub.max_records)
            (entries,) = await pipe.execute()
        if entries:
            return entries, ""
        groups = await self.client.xinfo_groups(self.key)
        return [], next((_s(g["last-delivered-id"]) for g in groups if _s(g["name"]) == self.service), "0-0")

    async def claim_pending(self, min_idle_ms: int) -> int:
        """Move entries pending on other consumers for at least ``min_idle_ms`` to this one
        (XPENDING + XCLAIM JUSTID, which works on Redis 6.2). Returns how many."""
        claimed, start = 0, "-"
        while True:
            rows = await self.client.xpending_range(
                self.key, self.service, min=start, max="+", count=READ_BATCH, idle=min_idle_ms or None
            )
            if not rows:
                return claimed
            theirs = [r["message_id"] for r in rows if _s(r["consumer"]) != self.consumer]
            if theirs:
                got = await self.client.xclaim(
                    self.key, self.service, self.consumer, min_idle_time=min_idle_ms, message_ids=theirs, justid=True
                )
                claimed += len(got)
                if len(got) < len(theirs):
                    await self._count_trimmed_on_claim(set(map(_s, theirs)) - set(map(_s, got)))
            if len(rows) < READ_BATCH:
                return claimed
            start = "(" + _s(rows[-1]["message_id"])

    async def _count_trimmed_on_claim(self, missing: set[str]) -> None:
        """Redis 7 drops a pending entry the stream no longer holds from the group when XCLAIM
        names it, and returns nothing for it (6.2 hands it over, and ``process`` counts it). Of the
        ids a claim did not return, those the stream no longer holds were trimmed; the others were
        taken or acknowledged by another consumer in between."""
        ids = sorted(missing, key=entry_id_key)
        async with self.client.pipeline(transaction=False) as pipe:
            for i in ids:
                pipe.xrange(self.key, min=i, max=i, count=1)
            found = await pipe.execute()
        trimmed = [i for i, rows in zip(ids, found) if not rows]
        if trimmed:
            self._trimmed(trimmed)

    async def drain_own_pending(self) -> int:
        """Handle every entry pending on this consumer, oldest first. Returns how many were read."""
        after, n = "0", 0
        while True:
            entries = await self.read(after, None)
            if not entries:
                return n
            await self.process(entries)
            n += len(entries)
            after = _s(entries[-1][0])


def _entries(reply: Any) -> list:
    """The entries of a read's reply: a list (plain reads) or ``(entries, last)`` (owner reads)."""
    return reply[0] if isinstance(reply, tuple) else reply


async def _settle(fut: asyncio.Future) -> None:
    """Let a read-ahead finish (reads are not cancelled, see ``Stopped``); what it read stays
    pending on this consumer for recovery."""
    with contextlib.suppress(BaseException):
        await fut


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
