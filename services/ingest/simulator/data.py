"""Candles for the simulator, from Binance kline files (shipped CSVs or data.binance.vision zips)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

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
