"""Ordered consumption (candle topics): one owner per group, entries in stream order, never past
an entry that was neither handled nor dead-lettered.

A consumer first takes the group's lease (``groups.OwnerLease``); without it, it waits as a hot
standby, trying again every third of the lease time. Once it owns the group it runs the
service's ``on_owner`` hooks (restore state), then ``recover``: every entry pending in the group
(a dead owner's, or its own from before a restart) is claimed and handled oldest first, then new
entries are read in batches. A batch is acknowledged only after every entry in it was handled or
dead-lettered; a failure is retried in place (``consuming.BatchProcessor``), so nothing behind
it is handled first. A renewal that finds the lease taken, or a lease that may have expired
while Redis was unreachable, stops the consumer before its next batch and sends it back to
standby; its acknowledgements are fenced by the lease token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Awaitable, Callable

from libs.common.bus.consuming import BLOCK_MS, BatchProcessor
from libs.common.bus.failures import INFRASTRUCTURE, Stall, classify
from libs.common.bus.groups import LeaseLost, OwnerLease

log = logging.getLogger("klinebus.bus")

Hook = Callable[[], Awaitable[Any]]


class OrderedConsumer:
    def __init__(self, proc: BatchProcessor, lease: OwnerLease, on_owner: list[Hook], gauge_owner) -> None:
        self.proc = proc
        self.lease = lease
        self.on_owner = on_owner
        self.gauge_owner = gauge_owner
        self.owner = False
        self.recovered = asyncio.Event()  # set once this replica owns the group and has recovered
        self.settled = asyncio.Event()  # set once it has recovered, or knows it is a standby
        self.proc.fence = self.lease.held
        self._stall = Stall(f"{proc.service}:{proc.sub.topic}:lease")

    @property
    def who(self) -> str:
        return f"{self.proc.service}:{self.proc.sub.topic}"

    async def run(self) -> None:
        while True:
            await self._acquire()
            renew = asyncio.create_task(self._renew_loop(), name=f"{self.who}:lease")
            try:
                await self._own()
            except LeaseLost as exc:
                log.error("%s: lost ownership (%s); back to standby", self.who, exc)
            finally:
                renew.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await renew
                self._set_owner(False)
                self.recovered.clear()

    async def _acquire(self) -> None:
        announced = False
        while True:
            try:
                if await self.lease.try_acquire():
                    self._stall.clear()
                    break
                if not announced:
                    holder = await self.lease.holder()
                    log.info("%s: %s owns the group; waiting as a hot standby", self.who, holder)
                    announced = True
                    self.settled.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                if classify(exc) != INFRASTRUCTURE:
                    raise
                self.settled.set()  # start() need not wait for Redis to come back
                await self._stall.wait(exc, "taking the ownership lease")
                continue
            await asyncio.sleep(self.lease.ttl_ms / 3000)
        self.proc.token = self.lease.token or ""
        self._set_owner(True)
        log.info("%s: %s owns the group now", self.who, self.proc.consumer)

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease.ttl_ms / 3000)
            try:
                if not await self.lease.renew():
                    log.error("%s: the ownership lease was taken by another replica", self.who)
                    return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a renewal that fails is retried; the fence stops us in time
                log.warning("%s: renewing the ownership lease failed: %s", self.who, exc)

    async def _own(self) -> None:
        for hook in self.on_owner:
            await hook()
        await self.recover()
        self.recovered.set()
        self.settled.set()
        while True:
            if not self.lease.held():
                raise LeaseLost("the lease expired or was taken")
            entries = await self.proc.read(">", BLOCK_MS)
            if entries:
                await self.proc.process(entries)

    async def recover(self) -> int:
        """Claim every entry pending in the group (whoever held it: we own the group) and handle
        them oldest first. Returns how many were handled."""
        while True:
            try:
                await self.proc.claim_pending(0)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                if "NOGROUP" in str(exc):
                    await self.proc.recreate_group()
                    continue
                if classify(exc) != INFRASTRUCTURE:
                    raise
                await self.proc.stall.wait(exc, "claiming pending entries")
        n = await self.proc.drain_own_pending()
        if n:
            log.info("%s: handled %d entries left pending before the start", self.who, n)
        return n

    def _set_owner(self, owner: bool) -> None:
        self.owner = owner
        self.gauge_owner.set(1 if owner else 0)

    async def release(self) -> None:
        with contextlib.suppress(Exception):
            await self.lease.release()
        self._set_owner(False)
