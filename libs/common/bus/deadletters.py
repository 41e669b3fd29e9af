"""Dead letters: a message a service could not use goes to ``dead-letters.v1`` with the reason.

The write is a plain XADD that raises when Redis refuses it: callers acknowledge the entry only
after its letter is written (a consumer waits a refused write out; it never acknowledges a dead
letter it failed to write). Each letter counts ``klinebus_<service>_dead_letters_total`` and logs
one line.
"""

from __future__ import annotations

import logging
from typing import Any

import redis.asyncio as aioredis

from libs.common import topics
from libs.common.bus.failures import reason_label
from libs.common.bus.framing import DATA_FIELD
from libs.common.contracts import DeadLetter, payload_preview
from libs.common.redact import redact
from libs.common.telemetry import ServiceMetrics

log = logging.getLogger("klinebus.bus")


class DeadLetters:
    def __init__(self, service: str, client: aioredis.Redis, maxlen: int, metrics: ServiceMetrics) -> None:
        self.service = service
        self.client = client
        self.maxlen = maxlen
        self.metrics = metrics
        self.stream = topics.stream_key(topics.DEAD_LETTERS)

    async def write(self, source: str, raw: Any, reason: str) -> None:
        reason = redact(" ".join(str(reason).split()))  # always one line, never a secret
        letter = DeadLetter(source=source, service=self.service, reason=reason, payload=redact(payload_preview(raw)))
        await self.client.xadd(self.stream, {DATA_FIELD: letter.to_json()}, maxlen=self.maxlen, approximate=True)
        log.warning("dead letter from %s: %s", source, reason, extra={"service": self.service, "source": source})
        self.metrics.dead_letters.labels(source, reason_label(reason)).inc()
