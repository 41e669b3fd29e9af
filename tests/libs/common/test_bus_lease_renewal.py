"""An owner that lost its lease stops renewing it, even when the cancellation of its renewal task
is lost: redis-py 8.1 sometimes swallows a ``Task.cancel()`` that lands inside a command (the
fault test with stuttering features replicas found a replica that had lost ownership, waited
forever for its renewal task and kept renewing the lease, so no replica consumed klines.v1)."""

from __future__ import annotations

import asyncio
import types

import redis.asyncio as aioredis

from libs.common.bus import LeaseLost, OwnerLease
from libs.common.bus.ordered import OrderedOwner

LEASE_MS = 600


class CancelSwallowingLease(OwnerLease):
    """A real lease whose renewal takes a while (a slow round trip) and, cancelled meanwhile,
    carries on as the redis-py client sometimes does."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.renewing = asyncio.Event()

    async def renew(self) -> bool:
        try:
            renewed = await super().renew()
            self.renewing.set()
            await asyncio.sleep(LEASE_MS / 3000)
            return renewed
        except asyncio.CancelledError:
            return True
        finally:
            self.renewing.clear()


class LosesOwnershipOnce(OrderedOwner):
    """Owns, loses the lease at once (as after a stop longer than the lease), then records that it
    went back to taking the lease."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.acquisitions = 0
        self.back_to_standby = asyncio.Event()

    async def _acquire(self) -> None:
        self.acquisitions += 1
        if self.acquisitions > 1:
            self.back_to_standby.set()
            await asyncio.Event().wait()  # stay a standby
        await super()._acquire()

    async def _own(self) -> None:
        await self.lease.renewing.wait()  # lost while a renewal is in flight: its cancellation is lost
        raise LeaseLost("test: the lease was lost")


async def test_a_lost_lease_is_not_renewed_even_when_cancelling_the_renewal_is_lost(redis_url):
    client = aioredis.Redis.from_url(redis_url)
    lease = CancelSwallowingLease(client, "features", ["klines.v1"], "a", LEASE_MS)
    proc = types.SimpleNamespace(stopping=None, sub=types.SimpleNamespace(topic="klines.v1"), fence=None, token="")
    owner = LosesOwnershipOnce("features", [proc], lease, [], [])
    task = asyncio.create_task(owner.run())
    try:
        await asyncio.wait_for(owner.back_to_standby.wait(), 10)  # not stuck waiting for its renewal loop
        # and the lease it lost expires, so a standby can take over
        standby = OwnerLease(client, "features", ["klines.v1"], "b", LEASE_MS)
        deadline = asyncio.get_running_loop().time() + 10
        while not await standby.try_acquire():
            assert asyncio.get_running_loop().time() < deadline, "the lost lease is still renewed"
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.wait([task], timeout=5)  # bounded: a stuck owner must fail the test, not hang it
        await client.aclose()
