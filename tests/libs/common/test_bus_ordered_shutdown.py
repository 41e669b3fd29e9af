"""The ordered owner's shutdown: every consumer loop's outcome is collected, so a loop that ends
after its sibling stopped the owner (its read is not cancelled) never surfaces as asyncio's
"Task exception was never retrieved" (the demo's shutdown ``LeaseLost`` traceback)."""

from __future__ import annotations

import asyncio
import gc
import time
from types import SimpleNamespace

from libs.common.bus.consuming import Stopped
from libs.common.bus.groups import LeaseLost
from libs.common.bus.ordered import OrderedOwner


class Lease:
    ttl_ms = 5_000
    token = "t"

    def __init__(self) -> None:
        self.valid = True

    def held(self) -> bool:
        return self.valid


class Proc:
    """A consumer loop: ``pump`` ends as scripted; ``late`` ignores the cancellation (a read in
    flight) and ends with LeaseLost once ``finish`` is set."""

    def __init__(self, topic: str, ends_with: type[BaseException], late: bool = False) -> None:
        self.sub = SimpleNamespace(topic=topic)
        self.stopping = None
        self.ends_with, self.late = ends_with, late
        self.finish = asyncio.Event()
        self.pumping = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def redis(self, doing, call):
        return await call()

    async def claim_pending(self, idle):
        return 0

    async def drain_own_pending(self):
        return 0

    async def pump(self, block, between, may_read_ahead):
        self.pumping.set()
        if not self.late:
            raise self.ends_with("stopping")
        while not self.finish.is_set():
            try:
                await self.finish.wait()
            except asyncio.CancelledError:
                self.cancelled.set()  # a read in flight is not cancelled: it finishes first
        raise self.ends_with("the lease was released under the read")


async def run_owner(owner: OrderedOwner, late: Proc) -> str:
    own = asyncio.ensure_future(owner._own())
    # The owner gives up on its loops when the first one ends; the late one finishes its read after.
    await asyncio.wait_for(late.cancelled.wait(), 10)
    late.finish.set()
    try:
        await asyncio.wait_for(own, 10)
    except Exception as exc:  # noqa: BLE001 - what the owner ended with is the result
        return type(exc).__name__
    return "returned"


async def test_a_consumer_loop_that_ends_after_its_sibling_stopped_the_owner_is_collected():
    loop = asyncio.get_running_loop()
    reported: list[dict] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))
    try:
        late = Proc("models.v1", LeaseLost, late=True)
        owner = OrderedOwner("inference", [Proc("features.v1", Stopped), late], Lease(), [], [])  # type: ignore[arg-type]
        ended = await run_owner(owner, late)
        deadline = time.monotonic() + 10
        while not _all_loops_done() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        del owner, late
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
    assert ended == "Stopped"
    assert [str(c.get("exception") or c.get("message")) for c in reported] == []


def _all_loops_done() -> bool:
    return all(t.done() for t in asyncio.all_tasks() if t.get_name().startswith("inference:"))
