"""Competing consumption (work queues, the archiver): replicas share a group's entries, in no
particular order across replicas. Each replica reads batches, handles them with the same failure
classification as ordered consumers, and acknowledges each batch once. Between batches it
reclaims entries a dead replica left pending for ``reclaim_idle_ms`` (XPENDING IDLE + XCLAIM),
so nothing of its own is in flight while it does.
"""

from __future__ import annotations

import logging
import time

from libs.common.bus.consuming import BLOCK_MS, BatchProcessor

log = logging.getLogger("klinebus.bus")


class CompetingConsumer:
    def __init__(self, proc: BatchProcessor, reclaim_idle_ms: int) -> None:
        self.proc = proc
        self.reclaim_idle_ms = reclaim_idle_ms
        self.name = f"{proc.service}:{proc.sub.topic}"
        self.topics = [proc.sub.topic]

    async def run(self) -> None:
        # Our own pending entries (a restart under the same name) first, then new ones.
        await self.proc.drain_own_pending()
        every_s = self.reclaim_idle_ms / 4000
        next_reclaim = time.monotonic() + every_s

        async def reclaim_when_due() -> None:
            nonlocal next_reclaim
            if time.monotonic() >= next_reclaim:
                await self.reclaim()
                next_reclaim = time.monotonic() + every_s

        await self.proc.pump(min(BLOCK_MS, max(self.reclaim_idle_ms // 4, 10)), reclaim_when_due,
                             lambda: time.monotonic() < next_reclaim)

    async def reclaim(self) -> int:
        try:
            claimed = await self.proc.claim_pending(self.reclaim_idle_ms)
        except Exception as exc:  # noqa: BLE001 - the next round tries again
            log.warning("%s: reclaiming %s failed: %s", self.proc.service, self.proc.sub.topic, exc)
            return 0
        if claimed:
            log.info("%s: reclaimed %d entries of %s a dead replica left pending", self.proc.service, claimed,
                     self.proc.sub.topic)
            await self.proc.drain_own_pending()
        return claimed
