"""Ordered consumption (candle topics): one owner per group, entries in stream order, never past
an entry that was neither handled nor dead-lettered.

A service's ordered groups are owned together: the replica first takes the service's lease
(``groups.OwnerLease``); without it, it waits as a hot standby, trying again every third of the
lease time. Once it owns them it runs the service's ``on_owner`` hooks once (restore state), then
``recover`` per group: every entry pending in the group (a dead owner's, or its own from before
a restart) is claimed and handled oldest first, then new entries are read in batches, one loop
per group. A batch is acknowledged only after every entry in it was handled or
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

from libs.common.bus.consuming import BLOCK_MS, BatchProcessor, Stopped
from libs.common.bus.failures import INFRASTRUCTURE, Stall, classify
from libs.common.bus.groups import LeaseLost, OwnerLease

log = logging.getLogger("klinebus.bus")

Hook = Callable[[int], Awaitable[Any]]


class Released(Exception):
    """This replica gives its partition up (a rebalance): the loops end after the batch in hand."""


class OrderedOwner:
    """The service's ordered consumers of one partition under one ownership lease (with one
    partition: all of them, the layout of old). ``run`` takes the lease whenever it is free (one
    partition, hot standbys); ``own_once`` runs one ownership the balancer (``balance``) took."""

    def __init__(self, service: str, procs: list[BatchProcessor], lease: OwnerLease, on_owner: list[Hook],
                 gauges: list[Any], *, partition: int = 0, on_release: list[Hook] | None = None) -> None:
        self.service = service
        self.procs = procs
        self.lease = lease
        self.on_owner = on_owner
        self.on_release = on_release if on_release is not None else []
        self.gauges = gauges
        self.partition = partition
        self.giving_up = asyncio.Event()
        self.owner = False
        self.recovered = asyncio.Event()  # set once this replica owns the groups and has recovered
        self.settled = asyncio.Event()  # set once it has recovered, or knows it is a standby
        for proc in procs:
            proc.fence = self.lease.held
        self._stall = Stall(f"{service}:lease")
        self.name = f"{service}:ordered" + (f"#{partition}" if partition else "")
        self.topics = [p.sub.topic for p in procs]

    async def run(self) -> None:
        while True:
            await self._acquire()
            try:
                await self.own_once()
            except LeaseLost as exc:
                log.error("%s: lost ownership (%s); back to standby", self.name, exc)

    async def own_once(self) -> None:
        """One ownership, the lease already taken: hooks, recovery, live loops, until the lease is
        lost (LeaseLost), the bus stops (Stopped) or the balancer asks for the partition back
        (Released). A clean end (Stopped, Released) runs the ``on_release`` hooks while the lease
        is still ours; a Released partition's lease is released here (a stopping bus releases
        every lease itself, after every loop ended)."""
        owning = asyncio.Event()
        owning.set()
        renew = asyncio.create_task(self._renew_loop(owning), name=f"{self.name}:lease")
        released = False
        try:
            await self._own()
        except (Stopped, Released):
            await self._released()
            released = True
            raise
        finally:
            # The loop also stops by itself: redis-py 8.1 sometimes loses a cancellation that
            # lands inside a command (tests/integration/test_faults.py, replicas stuttering),
            # and a renewal loop that outlives its owner keeps the lease forever, so no
            # replica consumes.
            owning.clear()
            renew.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await renew
            if released and self.giving_up.is_set() and not self._stopping():
                # Only after the renewal loop ended: a renewal racing the release could not
                # resurrect it (the token check), but would log a lost lease.
                with contextlib.suppress(Exception):
                    await self.lease.release()
                log.info("%s: %s gave partition %d up", self.name, self.lease.consumer, self.partition)
            self._set_owner(False)
            self.recovered.clear()
            self.giving_up.clear()

    def _stopping(self) -> bool:
        return self.procs[0].stopping is not None and self.procs[0].stopping.is_set()

    async def _released(self) -> None:
        """``on_release`` hooks, while the lease is still ours (after it, the state they write
        could be behind a new owner's)."""
        for hook in self.on_release:
            while self.lease.held():
                try:
                    await hook(self.partition)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - a failing release hook must not keep the partition
                    if classify(exc) != INFRASTRUCTURE:
                        log.exception("%s: %s failed for partition %d; giving it up anyway", self.name,
                                      getattr(hook, "__name__", "an on_release hook"), self.partition)
                        break
                    await self._stall.wait(exc, f"running {getattr(hook, '__name__', 'an on_release hook')}")

    async def _acquire(self) -> None:
        announced = False
        while True:
            if self.procs[0].stopping is not None and self.procs[0].stopping.is_set():
                raise Stopped
            try:
                if await self.lease.try_acquire():
                    self._stall.clear()
                    break
                if not announced:
                    holder = await self.lease.holder()
                    log.info("%s: %s owns %s; waiting as a hot standby", self.name, holder, ", ".join(self.topics))
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
        self.took()

    def took(self) -> None:
        """The lease was just taken: the reads and acknowledgements carry its token from now on."""
        for proc in self.procs:
            proc.token = self.lease.token or ""
        self._set_owner(True)
        log.info("%s: %s owns %s now", self.name, self.lease.consumer, ", ".join(self.topics))

    async def _renew_loop(self, owning: asyncio.Event) -> None:
        while owning.is_set():
            await asyncio.sleep(self.lease.ttl_ms / 3000)
            if not owning.is_set():
                return
            try:
                if not await self.lease.renew():
                    log.error("%s: the ownership lease expired or was taken by another replica", self.name)
                    return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a renewal that fails is retried; the fence stops us in time
                log.warning("%s: renewing the ownership lease failed: %s", self.name, exc)

    async def _own(self) -> None:
        for hook in self.on_owner:  # must be idempotent: re-run whole after an infrastructure failure
            while True:
                try:
                    await hook(self.partition)
                    self._stall.clear()
                    break
                except (asyncio.CancelledError, LeaseLost):
                    raise
                except Exception as exc:  # noqa: BLE001 - classified below
                    if classify(exc) != INFRASTRUCTURE:
                        raise
                    await self._stall.wait(exc, f"running {getattr(hook, '__name__', 'an on_owner hook')}")
                    if not self.lease.held():
                        raise LeaseLost("the lease expired while taking over") from None
        for proc in self.procs:
            await self.recover(proc)
        self.recovered.set()
        self.settled.set()
        suffix = f"#{self.partition}" if self.partition else ""
        loops = [asyncio.create_task(self._live(proc), name=f"{self.service}:{proc.sub.topic}{suffix}")
                 for proc in self.procs]
        for task in loops:
            # Whatever a loop ends with is collected, even one that ends after we stopped listening
            # (its read is not cancelled, see consuming.Stopped): else the loop's LeaseLost is
            # printed at shutdown as "Task exception was never retrieved".
            task.add_done_callback(_collect)
        try:
            done, running = await asyncio.wait(loops, return_when=asyncio.FIRST_EXCEPTION)
            if running and any(not t.cancelled() and isinstance(t.exception(), Released) for t in done):
                # A partition given up: every loop finishes and acknowledges its batch in hand and
                # ends at its next check (within one read), so the next owner re-handles nothing.
                more, _ = await asyncio.wait(running)
                done |= more
            for task in done:
                task.result()  # LeaseLost, Stopped, or a consumer's death
        finally:
            for task in loops:
                task.cancel()
            # Every loop ends before the lease is released (not only the first to fail): a loop
            # left running past its owner would read and log on into a stopped bus.
            await asyncio.wait(loops)

    async def _live(self, proc: BatchProcessor) -> None:
        async def lease_held() -> None:
            if not self.lease.held():
                raise LeaseLost("the lease expired or was taken")
            if self.giving_up.is_set():
                raise Released(f"partition {self.partition} goes to another replica")

        await lease_held()
        # A blocked read outlives a pause of this process on the server's side: entries arriving
        # then are delivered to this consumer. Blocking for well under the lease means such a
        # read has ended before a standby can take over, so nothing lands on a deposed owner.
        await proc.pump(min(BLOCK_MS, self.lease.ttl_ms // 4), lease_held, lambda: True)

    async def recover(self, proc: BatchProcessor) -> int:
        """Claim every entry pending in the group (whoever held it: we own the group) and handle
        them oldest first. Returns how many were handled."""
        await proc.redis("claiming pending entries", lambda: proc.claim_pending(0))
        n = await proc.drain_own_pending()
        if n:
            log.info("%s: handled %d entries of %s left pending before the start", self.service, n, proc.sub.topic)
        return n

    def _set_owner(self, owner: bool) -> None:
        # A gauge counts this replica's partitions of its topic (one partition: 1 or 0, as before).
        if owner != self.owner:
            for gauge in self.gauges:
                gauge.inc() if owner else gauge.dec()
        self.owner = owner

    async def release(self) -> None:
        with contextlib.suppress(Exception):
            await self.lease.release()
        self._set_owner(False)


def _collect(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("%s ended with %s", task.get_name(), type(task.exception()).__name__)
