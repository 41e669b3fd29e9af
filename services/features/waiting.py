"""The warm-up waiting room: candles of keys whose history is still being read.

A key seen for the first time (no state) warms up from its history off the hot path; its
candles wait here, in stream order, while every other key goes on. They are acknowledged on
arrival, so the checkpoint never passes the oldest one waiting (``oldest_ids``), and the keys
are recorded in Redis by the caller: after a crash the replay publishes them.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from libs.common.bus.framing import entry_id_key
from libs.common.contracts import KlineEvent

Key = tuple[str, str]


class WaitingRoom:
    def __init__(self) -> None:
        self._held: dict[Key, list[tuple[str, KlineEvent]]] = {}
        # Keys that started waiting and are not yet recorded in Redis (a failed write is retried
        # with the next batch, or the retry of this one).
        self._unrecorded: dict[Key, str] = {}

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, key: object) -> bool:
        return key in self._held

    def keys(self) -> list[Key]:
        return list(self._held)

    def open(self, key: Key, entry_id: str, event: KlineEvent) -> None:
        """``key`` starts waiting, with its first candle."""
        self._held[key] = [(entry_id, event)]
        self._unrecorded[key] = entry_id

    def add(self, key: Key, entry_id: str, event: KlineEvent) -> bool:
        """Appends the candle when its key waits (once: a batch handed over again holds nothing
        twice); False when its key does not wait."""
        waiting = self._held.get(key)
        if waiting is None:
            return False
        if entry_id_key(entry_id) > entry_id_key(waiting[-1][0]):
            waiting.append((entry_id, event))
        return True

    def unrecorded(self) -> dict[Key, str]:
        """Keys that started waiting, with their first entry id, not yet recorded."""
        return dict(self._unrecorded)

    def recorded(self, keys: Iterable[Key]) -> None:
        for key in keys:
            self._unrecorded.pop(key, None)

    def first(self, key: Key) -> KlineEvent:
        return self._held[key][0][1]

    def candles(self, keys: Iterable[Key]) -> list[KlineEvent]:
        """The candles of ``keys`` that wait, key by key, each key's in stream order."""
        return [e for key in keys if key in self._held for _, e in self._held[key]]

    def oldest_ids(self) -> Iterator[str]:
        """Each waiting key's first entry id."""
        return (waiting[0][0] for waiting in self._held.values())

    def leave(self, keys: Iterable[Key]) -> None:
        for key in keys:
            self._held.pop(key, None)
            self._unrecorded.pop(key, None)

    def clear(self) -> None:
        self._held.clear()
        self._unrecorded.clear()
