"""Candles for the simulator, from Binance kline files (shipped CSVs or data.binance.vision zips)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from libs.common.klines import Kline, infer_symbol_interval, iter_kline_csv


def load_candles(
    paths: Iterable[str | Path], limit: int | None = None, skip: int = 0
) -> dict[tuple[str, str], list[Kline]]:
    """``SYMBOL-INTERVAL-...`` files -> {(symbol, interval): candles}; ``skip``/``limit`` slice each."""
    out: dict[tuple[str, str], list[Kline]] = {}
    for path in paths:
        symbol, interval = infer_symbol_interval(path)
        got: list[Kline] = []
        for i, k in enumerate(iter_kline_csv(path, symbol, interval)):
            if i < skip:
                continue
            if limit is not None and len(got) >= limit:
                break
            got.append(k)
        out.setdefault((symbol, interval), []).extend(got)
    for key in out:
        out[key].sort(key=lambda k: k.open_time)
    return out


def many_streams(base: Mapping[tuple[str, str], Sequence[Kline]], n: int) -> dict[tuple[str, str], list[Kline]]:
    """``n`` streams of ``base``'s real candles under made-up symbols (``S00000BTCUSDT``,
    ``S00001ETHUSDT``, ... taking the streams of ``base`` in turn), all closing at the same
    moments: as many streams closing together as a burst test or benchmark needs."""
    sources = [ks for ks in base.values() if ks]
    if not sources:
        raise ValueError("many_streams needs at least one stream with candles")
    out: dict[tuple[str, str], list[Kline]] = {}
    for i in range(n):
        src = sources[i % len(sources)]
        symbol = f"S{i:05d}{src[0].symbol}"
        out[(symbol, src[0].interval)] = [replace(k, symbol=symbol) for k in src]
    return out
