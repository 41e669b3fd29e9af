"""The replay tape: every websocket message the exchange would send, in time order.

Each candle yields ``updates_per_candle`` in-progress updates (``x: false``) spread over
its life, then the final one (``x: true``) just after it closes, as Binance does.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, replace
from typing import Iterator, Mapping, Sequence

from libs.common.klines import Kline, interval_ms, kline_to_ws_payload, ws_stream_name


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


def partial(k: Kline, fraction: float) -> Kline:
    """The candle as it looked ``fraction`` of the way through its life (a plausible path)."""
    close = k.open + (k.close - k.open) * fraction
    return replace(
        k,
        close=close,
        high=max(k.open, close),
        low=min(k.open, close),
        volume=k.volume * fraction,
        quote_volume=k.quote_volume * fraction,
        trades=int(k.trades * fraction),
        taker_buy_base=k.taker_buy_base * fraction,
        taker_buy_quote=k.taker_buy_quote * fraction,
        closed=False,
    )


def stream_events(klines: Sequence[Kline], updates_per_candle: int) -> Iterator[TapeEvent]:
    for k in klines:
        stream = ws_stream_name(k.symbol, k.interval)
        life = k.close_time - k.open_time + 1
        for j in range(updates_per_candle):
            f = (j + 1) / (updates_per_candle + 1)
            yield TapeEvent(k.open_time + int(life * f), stream, partial(k, f))
        yield TapeEvent(k.close_time + 1, stream, replace(k, closed=True))


def build_tape(
    candles: Mapping[tuple[str, str], Sequence[Kline]], updates_per_candle: int
) -> list[TapeEvent]:
    """All streams merged by send time (stable: a stream's own order is kept)."""
    iters = [stream_events(sorted(ks, key=lambda k: k.open_time), updates_per_candle) for ks in candles.values()]
    return list(heapq.merge(*iters, key=lambda e: e.time))


def finest_interval_ms(candles: Mapping[tuple[str, str], Sequence[Kline]]) -> int:
    return min(interval_ms(i) for _, i in candles)
