"""Partitions balanced over a service's replicas, cooperatively (Kafka's incremental rebalance,
without a coordinator): every replica heartbeats a membership key, reads who holds each
partition's lease, and computes the same target share for every live member; one below its share
takes free partitions (``SET NX`` leases, fenced as ever), one above it gives the surplus up after
the batch in hand. Only the partitions that move stop; a dead replica's leases expire within one
lease time and its partitions are free.

The extra partitions (``P % n``) go to the members that hold the most now (ties: by name), so a
replica never gives up a partition only to have another take it from a neutral start: with one
partition the owner keeps it and the other replicas stay hot standbys, as before partitions.
A replica whose share is met may still take a partition that stayed free for a whole round (a
dead member not yet expired from the membership counts against the others' shares until then).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import redis.asyncio as aioredis

from libs.common import topics
from libs.common.bus.consuming import Stopped
from libs.common.bus.failures import INFRASTRUCTURE, Stall, classify
from libs.common.bus.groups import LeaseLost
from libs.common.bus.ordered import OrderedOwner, Released

log = logging.getLogger("klinebus.bus")

# KEYS[1] the service's membership (a sorted set: member -> the server's time, in ms, it expires
# at); ARGV[1] this member, ARGV[2] ttl in ms. The server's clock only: replicas' clocks differ.
_BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""


def members_key(group: str) -> str:
    return f"{topics.KEY_PREFIX}:members:{group}"


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def shares(members: list[str], held: dict[str, int], partitions: int) -> dict[str, int]:
    """Each live member's target number of partitions: ``partitions`` spread evenly, the extra
    ones to the members holding the most now (ties by name)."""
    if not members:
        return {}
    base, extra = divmod(partitions, len(members))
    ranked = sorted(members, key=lambda m: (-held.get(m, 0), m))
    return {m: base + (1 if i < extra else 0) for i, m in enumerate(ranked)}


class PartitionBalancer:
    """One ``OrderedOwner`` per partition, taken and given up as the membership changes."""

    def __init__(self, service: str, consumer: str, client: aioredis.Redis, units: list[OrderedOwner],
                 ttl_ms: int) -> None:
        self.service = service
        self.consumer = consumer
        self.client = client
        self.units = units
        self.ttl_ms = ttl_ms
        self.name = f"{service}:ordered"
        self.topics = sorted({t for u in units for t in u.topics})
        self.key = members_key(service)
        self.settled = asyncio.Event()
        self.changed = asyncio.Event()  # a partition's task ended: look again now
        self._beat = client.register_script(_BEAT)
        self._tasks: dict[int, asyncio.Task[Any]] = {}
        self._free_before: set[int] = set()
        self._stall = Stall(f"{service}:balance")
        self._settler: asyncio.Future | None = None
        self.rounds = 0

    @property
    def owner(self) -> bool:
        return any(u.owner for u in self.units)

    def owned(self) -> frozenset[int]:
        return frozenset(u.partition for u in self.units if u.owner)

    def _stopping(self) -> bool:
        stopping = self.units[0].procs[0].stopping
        return stopping is not None and stopping.is_set()

    async def run(self) -> None:
        try:
            while not self._stopping():
                self._reap()
                try:
                    await self.round()
                    self._stall.clear()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - classified below
                    if classify(exc) != INFRASTRUCTURE:
                        raise
                    self.settled.set()  # start() need not wait for Redis to come back
                    await self._stall.wait(exc, "balancing partitions")
                    continue
                self.rounds += 1
                self.changed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake(), self.ttl_ms / 3000)
        finally:
            # Every partition's loops end before the bus releases the leases (by themselves when
            # the bus stops; a dying consumer takes the others down with it).
            if self._tasks:
                if not self._stopping():
                    for task in self._tasks.values():
                        task.cancel()
                await asyncio.wait(list(self._tasks.values()))
            self._reap(final=True)
        raise Stopped

    async def _wake(self) -> None:
        stopping = self.units[0].procs[0].stopping
        waits = [asyncio.ensure_future(self.changed.wait())]
        if stopping is not None:
            waits.append(asyncio.ensure_future(stopping.wait()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    def _reap(self, final: bool = False) -> None:
        """Collect the partitions whose ownership ended; a consumer's death is the service's."""
        for p, task in list(self._tasks.items()):
            if not task.done():
                continue
            del self._tasks[p]
            if task.cancelled():
                continue
            exc = task.exception()
            if exc is None or isinstance(exc, (Released, Stopped)):
                continue
            if isinstance(exc, LeaseLost):
                log.error("%s: lost partition %d (%s)", self.name, p, exc)
                continue
            if not final:
                raise exc

    async def round(self) -> None:
        members = [_s(m) for m in await self._beat(keys=[self.key], args=[self.consumer, self.ttl_ms])]
        if self.consumer not in members:
            members.append(self.consumer)
        holders = await self._holders()
        self._reap()  # a partition given up while we read counts as given up
        held: dict[str, int] = {}
        for h in holders:
            if h is not None:
                held[h] = held.get(h, 0) + 1
        mine = set(self._tasks)
        held[self.consumer] = len(mine)  # ours as we run them (a lease just given up may linger)
        share = shares(sorted(set(members)), held, len(self.units)).get(self.consumer, 0)
        free = [p for p, h in enumerate(holders) if h is None and p not in mine]
        free_twice = [p for p in free if p in self._free_before]
        self._free_before = set(free)
        if len(mine) > share:
            for p in sorted(mine, reverse=True)[: len(mine) - share]:
                unit = self.units[p]
                if not unit.giving_up.is_set():
                    log.info("%s: giving partition %d up (%d held, share %d of %d members)", self.name, p,
                             len(mine), share, len(members))
                    unit.giving_up.set()
        else:
            want = share - len(mine)
            # Start from a different partition per member so replicas rarely race for one lease.
            offset = sum(map(ord, self.consumer)) % max(1, len(self.units))
            order = sorted(free, key=lambda p: (p - offset) % len(self.units))
            if want <= 0:
                ceil = -(-len(self.units) // max(1, len(set(members))))
                order = [p for p in order if p in free_twice][: max(0, ceil - len(mine))]
                want = len(order)
            for p in order:
                if want <= 0:
                    break
                if await self._take(p):
                    want -= 1
        if not self.settled.is_set():
            taken = [self.units[p] for p in self._tasks]
            if taken:
                self._settler = asyncio.ensure_future(self._settle_when_recovered(taken))
            else:
                self.settled.set()

    async def _settle_when_recovered(self, units: list[OrderedOwner]) -> None:
        for unit in units:
            task = self._tasks.get(unit.partition)
            if task is None:
                continue
            recovered = asyncio.ensure_future(unit.recovered.wait())
            await asyncio.wait([recovered, task], return_when=asyncio.FIRST_COMPLETED)
            recovered.cancel()
        self.settled.set()

    async def _holders(self) -> list[str | None]:
        # One GET per lease (a cluster spreads them over slots), sent together.
        raws = await asyncio.gather(*(self.client.get(u.lease.key) for u in self.units))
        return [_s(r).rsplit(":", 1)[0] if r is not None else None for r in raws]

    async def _take(self, p: int) -> bool:
        unit = self.units[p]
        if not await unit.lease.try_acquire():
            return False
        unit.giving_up.clear()
        unit.took()
        self._tasks[p] = task = asyncio.create_task(unit.own_once(), name=f"{self.name}#{p}")
        task.add_done_callback(lambda _t: self.changed.set())
        return True

    async def release(self) -> None:
        """A clean stop: leave the membership (the others rebalance at once) and release every
        lease still ours (their ``on_release`` hooks ran as each loop stopped)."""
        for unit in self.units:
            await unit.release()
        with contextlib.suppress(Exception):
            await self.client.zrem(self.key, self.consumer)
