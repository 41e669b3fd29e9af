"""The features component through its port, with no Redis: the port is an in-memory stand-in
(a stream of entries, a once-per-candle guard, dead letters, a checkpoint, waiting records, a
history per key). The lifecycle (become owner, batches, the release loop, stop, a new owner)
runs as the bus edge would run it."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest

from libs.common.contracts import KlineEvent
from libs.common.klines import read_kline_csv
from libs.common.telemetry import ServiceMetrics
from services.features.position import Checkpoint, id_key as entry_id_key
from services.features.component import FeaturesComponent
from services.features.state import FeaturesState
from tests.candles import BTC_15M

SET = "skeleton-v1"
HISTORY, LIVE = 40, 5
DEADLINE_S = 30.0


class Injected(RuntimeError):
    pass


class MemoryPort:
    """``FeaturesPort`` in memory. ``fail`` names a method and how it fails ('raise' or 'kill':
    never returns) the first time it is called with something to do."""

    def __init__(self, history: dict[tuple[str, str], list]) -> None:
        self.stream: list[tuple[str, KlineEvent]] = []
        self.acked: set[str] = set()
        self.features: list[tuple[str, int]] = []
        self.last: dict[tuple[str, str], int] = {}
        self.letters: list[tuple[KlineEvent, str]] = []
        self.saved: Checkpoint | None = None
        self.waiting: dict[tuple[str, str], str] = {}
        self._history = history
        self.fail: tuple[str, str] | None = None
        self.reached = asyncio.Event()

    async def _maybe_fail(self, method: str) -> None:
        if self.fail is not None and self.fail[0] == method:
            how = self.fail[1]
            self.fail = None
            self.reached.set()
            if how == "raise":
                raise Injected(method)
            await asyncio.Event().wait()

    async def publish(self, events) -> int:
        if events:
            await self._maybe_fail("publish")
        n = 0
        for e in events:
            key = (e.symbol, e.interval)
            if self.last.get(key, -1) < e.open_time:
                self.last[key] = e.open_time
                self.features.append((e.symbol, e.open_time))
                n += 1
        return n

    async def dead_letter(self, event, reason) -> None:
        self.letters.append((event, reason))

    async def load_checkpoint(self):
        return self.saved

    async def save_checkpoint(self, saved) -> None:
        self.saved = saved

    async def record_waiting(self, keys) -> None:
        self.waiting.update(keys)

    async def load_waiting(self):
        return dict(self.waiting)

    async def release_waiting(self, keys) -> None:
        if keys:
            await self._maybe_fail("release_waiting")
        for key in keys:
            self.waiting.pop(key, None)

    async def entries_after(self, entry_id):
        after = entry_id_key(entry_id)
        chunk = [(i, e, i not in self.acked) for i, e in self.stream if entry_id_key(i) > after]
        if chunk:
            yield chunk

    async def history(self, symbol, interval, before):
        ks = [k for k in self._history.get((symbol, interval), []) if k.open_time < before]
        return tuple(np.array([getattr(k, c) for k in ks]) for c in ("open_time", "open", "high", "low", "close", "volume"))

    # the bus's side: entries arrive, a batch is handed over and acknowledged
    def add(self, events) -> list[str]:
        ids = [f"{len(self.stream) + i + 1}-0" for i in range(len(events))]
        self.stream += list(zip(ids, events))
        return ids


def component(port: MemoryPort) -> FeaturesComponent:
    return FeaturesComponent(FeaturesState(SET, "continue", warms_up=True), port, ServiceMetrics("features"),
                             checkpoint_every_s=3600)


def candles(symbol: str):
    return [replace(k, symbol=symbol) for k in read_kline_csv(BTC_15M, "BTCUSDT", "15m")[: HISTORY + LIVE]]


async def hand_over(port: MemoryPort, comp: FeaturesComponent, events) -> None:
    ids = port.add(events)
    await comp.on_batch(events, ids)
    port.acked.update(ids)


@pytest.mark.parametrize("method, how", [
    ("publish", "raise"), ("publish", "kill"), ("release_waiting", "raise"), ("release_waiting", "kill"),
])
async def test_a_failure_at_a_step_of_the_release_then_a_new_owner_publishes_every_held_candle_once(method, how):
    new, old = candles("NEWUSDT"), candles("OLDUSDT")
    port = MemoryPort({("NEWUSDT", "15m"): new[:HISTORY], ("OLDUSDT", "15m"): old[:HISTORY]})
    first = component(port)
    await first.become_owner()
    await hand_over(port, first, [KlineEvent.from_kline(k) for k in old[HISTORY : HISTORY + 1]])
    releases = asyncio.create_task(first.run_releases())
    while ("OLDUSDT", "15m") in port.waiting or first.state.waiting:  # OLD's release goes through
        assert not releases.done()
        await asyncio.sleep(0.01)
    port.fail = (method, how)
    await hand_over(port, first, [KlineEvent.from_kline(k) for k in new[HISTORY:]])
    await asyncio.wait_for(port.reached.wait(), DEADLINE_S)
    if how == "kill":
        releases.cancel()
    with pytest.raises((Injected, asyncio.CancelledError)):
        await releases
    await first.stop()  # the final checkpoint

    second = component(port)
    await second.become_owner()
    assert [t for s, t in port.features if s == "NEWUSDT"] == [k.open_time for k in new[HISTORY:]]
    assert [t for s, t in port.features if s == "OLDUSDT"] == [old[HISTORY].open_time]
    assert port.waiting == {}


async def test_a_poisoned_candle_is_a_dead_letter_and_its_batch_mates_are_published():
    a, b = candles("AAAUSDT"), candles("BBBUSDT")
    port = MemoryPort({})
    comp = FeaturesComponent(FeaturesState(SET, "continue", warms_up=False), port, ServiceMetrics("features"),
                             checkpoint_every_s=3600)
    await comp.become_owner()
    events = [KlineEvent.from_kline(k) for pair in zip(a, b) for k in pair]
    bad = KlineEvent.model_construct(**{**events[41].model_dump(), "volume": 1.7e308, "close": 1e308,
                                        "high": 1e308})
    await hand_over(port, comp, events[:41] + [bad] + events[42:])
    assert [(e.symbol, e.open_time) for e, _ in port.letters] == [("BBBUSDT", b[20].open_time)]
    assert len(port.features) == len(events) - 1
    await comp.stop()
    assert port.saved is not None and port.saved.entry_id == f"{len(events)}-0"


async def test_a_poisoned_candle_waiting_for_its_keys_warm_up_is_a_dead_letter_after_a_restart():
    """Stopped while releasing: the new owner's replay judges the held candles again, publishes
    the good ones and dead-letters the poisoned one."""
    new = candles("NEWUSDT")
    port = MemoryPort({("NEWUSDT", "15m"): new[:HISTORY]})
    first = component(port)
    await first.become_owner()
    live = [KlineEvent.from_kline(k) for k in new[HISTORY:]]
    live[1] = KlineEvent.model_construct(**{**live[1].model_dump(), "volume": 1.7e308})
    port.fail = ("publish", "kill")
    releases = asyncio.create_task(first.run_releases())
    await hand_over(port, first, live)
    await asyncio.wait_for(port.reached.wait(), DEADLINE_S)
    releases.cancel()
    with pytest.raises(asyncio.CancelledError):
        await releases
    await first.stop()
    assert port.letters == []

    second = component(port)
    await second.become_owner()
    assert [t for _, t in port.features] == [e.open_time for i, e in enumerate(live) if i != 1]
    assert [(e.open_time, "beyond what a Binance kline can carry" in why) for e, why in port.letters] == [
        (live[1].open_time, True)]
