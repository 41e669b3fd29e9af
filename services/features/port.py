"""What the features component needs from the world outside it, and nothing more: the bus edge
(``app.RedisPort``) implements it over Redis; tests implement it with lists."""

from __future__ import annotations

from typing import AsyncIterator, Protocol

from libs.common.contracts import KlineEvent, Prepared
from services.features.position import Checkpoint
from services.features.waiting import Key


class FeaturesPort(Protocol):
    # features.v1 and dead letters
    async def publish(self, events: list[Prepared]) -> int:
        """Append each event once per candle (a failed call keeps its events for the next one);
        returns how many were appended."""

    async def dead_letter(self, event: KlineEvent, reason: str) -> None: ...

    # what survives a restart
    async def load_checkpoint(self) -> Checkpoint | None: ...

    async def save_checkpoint(self, saved: Checkpoint) -> None: ...

    async def record_waiting(self, keys: dict[Key, str]) -> None:
        """Keys whose candles wait for their warm-up, with their first entry id."""

    async def load_waiting(self) -> dict[Key, str]: ...

    async def release_waiting(self, keys: list[Key]) -> None: ...

    def entries_after(self, entry_id: str) -> AsyncIterator[list[tuple[str, KlineEvent, bool]]]:
        """klines.v1 entries after ``entry_id`` that the group was handed, in stream order, in
        chunks of ``(entry_id, event, pending)``."""

    # history, for warm-ups
    async def history(self, symbol: str, interval: str, before: int) -> tuple:
        """``(open_time, o, h, l, c, v)`` columns of the key's candles before ``before``."""
