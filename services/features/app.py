"""Features service: klines.v1 -> the streaming indicator engine -> features.v1.

One event per closed candle. While a key warms up, its event carries ``warm: false`` and no
values; after that every value is a real number. A candle that is impossible, or whose numbers
a Binance kline cannot carry, or that would leave its key's indicators non-finite, is a dead
letter, and its batch-mates are published.

This module is the bus edge: it builds the component (``component.FeaturesComponent``, around
the domain state machine ``state.FeaturesState``), implements its port over Redis
(``RedisPort``) and hands it the bus's lifecycle: start, becoming owner, each ordered batch,
the release loop, stop.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from libs.common import topics
from libs.common.bus import Bus, OncePerCandle, redis_client
from libs.common.contracts import FeaturesEvent, KlineEvent, Prepared
from libs.common.service import ServiceRuntime
from services.features import checkpoint, history
from services.features.component import FeaturesComponent
from services.features.settings import FeaturesSettings
from services.features.state import FeaturesState
from services.features.waiting import Key

SETTINGS = FeaturesSettings
# Rows of the indicator state updated per replay step after a restart.
REPLAY_CHUNK = 1000


class RedisPort:
    """``port.FeaturesPort`` over Redis for one partition: the once-per-candle guard on features.v1,
    the dead-letter stream, the partition's checkpoint hashes beside features.v1, its klines.v1
    stream for the replay."""

    def __init__(self, bus: Bus, client, out: OncePerCandle, source: history.History | None,
                 partition: int = 0) -> None:
        self.bus, self.client, self.out, self.source = bus, client, out, source
        self.partition = partition

    async def publish(self, events: list[Prepared]) -> int:
        return await self.out.publish_all(events)

    async def dead_letter(self, event: KlineEvent, reason: str) -> None:
        await self.bus.dead_letter(topics.KLINES, event.to_json(), reason)

    async def load_checkpoint(self) -> checkpoint.Checkpoint | None:
        return await checkpoint.load(self.client, self.partition)

    async def save_checkpoint(self, saved: checkpoint.Checkpoint) -> None:
        await checkpoint.save(self.client, saved, self.partition)

    async def record_waiting(self, keys: dict[Key, str]) -> None:
        await checkpoint.record_waiting(self.client, keys, self.partition)

    async def load_waiting(self) -> dict[Key, str]:
        return await checkpoint.load_waiting(self.client, self.partition)

    async def release_waiting(self, keys: list[Key]) -> None:
        await checkpoint.release_waiting(self.client, keys, self.partition)

    def entries_after(self, entry_id: str) -> AsyncIterator[list[tuple[str, KlineEvent, bool]]]:
        return checkpoint.entries_after(self.client, self.bus.service, entry_id, REPLAY_CHUNK, self.partition)

    async def history(self, symbol: str, interval: str, before: int) -> tuple:
        assert self.source is not None, "no history source: keys warm up live"
        return await self.source(symbol, interval, before)


def create(settings: FeaturesSettings, url: str) -> ServiceRuntime:
    runtime = ServiceRuntime(
        "features", settings, url, description="Indicators and candlestick patterns for every closed candle."
    )
    bus = runtime.bus
    bus.publisher(topics.FEATURES, FeaturesEvent)
    client = redis_client(url)
    # A crash between publishing and acknowledging re-delivers the candle; the guard keeps
    # features.v1 at exactly one event per candle anyway.
    out = bus.once_per_candle(topics.FEATURES, client)
    source = history.source(settings, client)
    # One component per partition of klines.v1: state, checkpoint and waiting records each its own,
    # so a partition moves between replicas without touching the others.
    family: list[FeaturesComponent] = []
    components = [
        FeaturesComponent(FeaturesState(settings.feature_set, settings.gap_policy, warms_up=source is not None),
                          RedisPort(bus, client, out, source, p), runtime.metrics,
                          checkpoint_every_s=settings.checkpoint_every_s, family=family)
        for p in range(bus.partitions)
    ]
    runtime.health.set("state_restored",
                       lambda: all(components[p].restored for p in bus.owned_partitions()))

    @runtime.on_startup
    async def compile_kernels() -> None:
        await components[0].start()

    @bus.on_owner
    async def restore_state(partition: int) -> None:
        """Runs when this replica takes a partition (at start, a standby taking over, a rebalance)."""
        await components[partition].become_owner()

    @bus.on_release
    async def release_state(partition: int) -> None:
        await components[partition].release()

    @runtime.background
    async def release_warmed() -> None:
        await asyncio.gather(*(c.run_releases() for c in components))

    @bus.ordered_batch(topics.KLINES, KlineEvent, description="Compute the feature set for every closed candle.")
    async def on_klines(events: list[KlineEvent], entry_ids: list[str]) -> None:
        # A batch comes from one partition's stream: its entry ids are that partition's.
        await components[bus.partition_of(events[0].symbol, events[0].interval)].on_batch(events, entry_ids)

    @runtime.on_shutdown
    async def final_checkpoint() -> None:
        try:
            for c in components:
                await c.stop()
        finally:
            await client.aclose()

    return runtime
