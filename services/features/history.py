"""Where a key's history comes from for its warm-up (``warmup_source``): the klines Parquet
archive, or the key's earlier candles on klines.v1."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import numpy as np

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
            ks = await recent_candles(client, symbol, interval, n, before, partitions=settings.partitions)
            return tuple(np.array([getattr(k, c) for k in ks]) for c in COLUMNS)

        return from_stream
    root = settings.archive_url or str(settings.data_dir / "archive")

    async def from_archive(symbol: str, interval: str, before: int) -> tuple:
        frame = await asyncio.to_thread(read_archive, root, symbol, interval, None, before - 1)
        frame = frame if n is None else frame.tail(n)
        return tuple(frame[c].to_numpy() for c in COLUMNS)

    return from_archive

