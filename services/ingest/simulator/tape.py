"""The replay tape: every websocket message the exchange would send, in time order.

Each candle yields ``updates_per_candle`` in-progress updates (``x: false``, see ``path``:
on the symbol's tick grid, high and low widening, volume growing) spread over its life, then
the final one (``x: true``), exactly the recorded candle, just after it closes, as Binance does.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, replace
from typing import Iterator, Mapping, Sequence

from libs.common.klines import Kline, interval_ms, kline_to_ws_payload, ws_stream_name
from services.ingest.simulator.path import grid_decimals, in_progress


@dataclass(frozen=True, slots=True)
class TapeEvent:
    time: int  # simulated ms when the exchange sends it
    stream: str
    kline: Kline

    @property
    def closed(self) -> bool:
        return self.kline.closed

    def payload(self) -> dict:
        return kline_to_ws_payload(self.kline, event_time=self.time)


def stream_events(
    klines: Sequence[Kline], updates_per_candle: int, grid: tuple[int, int], seed: int = 0
) -> Iterator[TapeEvent]:
    for k in klines:
        stream = ws_stream_name(k.symbol, k.interval)
        life = k.close_time - k.open_time + 1
        for j, state in enumerate(in_progress(k, updates_per_candle, *grid, seed=seed)):
            yield TapeEvent(k.open_time + life * (j + 1) // (updates_per_candle + 1), stream, state)
        yield TapeEvent(k.close_time + 1, stream, replace(k, closed=True))


def build_tape(
    candles: Mapping[tuple[str, str], Sequence[Kline]], updates_per_candle: int, seed: int = 0
) -> list[TapeEvent]:
    """All streams merged by send time (stable: a stream's own order is kept)."""
    grids: dict[str, tuple[int, int]] = {}
    for symbol in {s for s, _ in candles}:
        grids[symbol] = grid_decimals(k for (s, _), ks in candles.items() if s == symbol for k in ks)
    iters = [
        stream_events(sorted(ks, key=lambda k: k.open_time), updates_per_candle, grids[symbol], seed)
        for (symbol, _), ks in candles.items()
    ]
    return list(heapq.merge(*iters, key=lambda e: e.time))


def finest_interval_ms(candles: Mapping[tuple[str, str], Sequence[Kline]]) -> int:
    return min(interval_ms(i) for _, i in candles)
