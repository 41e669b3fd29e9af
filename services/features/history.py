"""Where a key's history comes from for its warm-up (``warmup_source``): the klines Parquet
archive, or the key's earlier candles on klines.v1."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import numpy as np

from libs.common import topics
from libs.common.archive import read_archive
from libs.common.stream_history import recent_candles
from services.features.settings import FeaturesSettings

History = Callable[[str, str, int], Awaitable[tuple]]
COLUMNS = ("open_time", "open", "high", "low", "close", "volume")


def source(settings: FeaturesSettings, client) -> History | None:
    """``(symbol, interval, before_open_time) -> (open_time, o, h, l, c, v)``: the last
    ``warmup_candles`` candles of a key before a time; None: keys warm up live."""
    n = settings.warmup_candles or None  # None: all of it
    if settings.warmup_source == "none":
        return None
    if settings.warmup_source == "stream":

        async def from_stream(symbol: str, interval: str, before: int) -> tuple:
            p = topics.partition_of(symbol, interval, settings.partitions)
            ks = await recent_candles(client if p == 0 else _PartitionStream(client, p), symbol, interval, n, before)
            return tuple(np.array([getattr(k, c) for k in ks]) for c in COLUMNS)

        return from_stream
    root = settings.archive_url or str(settings.data_dir / "archive")

    async def from_archive(symbol: str, interval: str, before: int) -> tuple:
        frame = await asyncio.to_thread(read_archive, root, symbol, interval, None, before - 1)
        frame = frame if n is None else frame.tail(n)
        return tuple(frame[c].to_numpy() for c in COLUMNS)

    return from_archive


class _PartitionStream:
    """A client whose klines.v1 is partition ``p``'s stream, for ``recent_candles``, which reads
    partition 0's only (a request to give it the partition is filed with the bus engineer; until
    then this keeps a key of another partition from finding no history and warming up live).
    ``recent_candles`` only pages with XREVRANGE."""

    def __init__(self, client, partition: int) -> None:
        self._client, self._key = client, topics.stream_key(topics.KLINES, partition)

    async def xrevrange(self, name, **kw):
        assert name == topics.stream_key(topics.KLINES), name
        return await self._client.xrevrange(self._key, **kw)
