"""Broadcast consumption: every replica reads every entry of a topic (inference's models.v1, which
each replica must load), with XREAD from the stream's end at start and the position kept in
memory: no consumer group, nothing acknowledged, nothing pending. A service whose start-up read
the topic already (``since``) starts after what it read, so nothing appended meanwhile is missed.
Decoding, retries, back-off and dead letters are the ordered and competing consumers'
(``consuming.BatchProcessor``); a dead letter is written by each replica that fails the entry.
"""

from __future__ import annotations

import logging
from typing import Any

from libs.common.bus.consuming import BLOCK_MS, BatchProcessor, entries_of_reply

log = logging.getLogger("klinebus.bus")


class BroadcastConsumer:
    def __init__(self, proc: BatchProcessor) -> None:
        self.proc = proc
        self.name = f"{proc.service}:{proc.sub.topic}:broadcast"
        self.topics = [proc.sub.topic]
        self.position = "$"
        proc.ack = self._no_ack  # type: ignore[method-assign]  # nothing to acknowledge without a group
        # The client is this consumer's own: its XREAD replies skip redis-py's dict per entry.
        proc.client.set_response_callback("XREAD", entries_of_reply)

    async def _no_ack(self, ids: list[str]) -> None:
        return None

    async def prepare(self) -> None:
        """Fix where reading starts before ``Bus.start`` returns: after the entry the service's
        start-up reflected (``since``), else at the stream's current end; an entry appended once
        it has returned is seen."""
        proc = self.proc
        since = proc.sub.since() if proc.sub.since is not None else None
        if since is not None:
            self.position = since
            return
        last = await proc.redis("finding the stream's end", lambda: proc.client.xrevrange(proc.key, count=1))
        self.position = _s(last[0][0]) if last else "0-0"

    async def run(self) -> None:
        proc = self.proc
        if self.position == "$":
            await self.prepare()
        while True:
            proc._check_running()
            reply = await proc.redis(
                "reading", lambda: proc.client.xread({proc.key: self.position}, count=proc.sub.max_records,
                                                     block=BLOCK_MS))
            entries = reply or []
            if entries:
                await proc.process(entries)
                self.position = _s(entries[-1][0])


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
