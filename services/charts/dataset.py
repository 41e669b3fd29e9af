"""Dataset mode: chart images of sliding windows over a kline file, rendered in parallel.

Indicators are computed once over the whole file (the same kernels as live),
so each window's lines are those the live service would have drawn. Windows
start where the preset's indicators are warmed up. ``index.csv`` lists each
image with its window and the next candle's close, for the trainer's labels.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from libs.common.klines import infer_symbol_interval, read_kline_frame
from libs.charting.indicators import LOOKBACK, window_from_frame
from libs.charting.pool import RenderPool
from libs.charting.presets import ChartPreset
from libs.charting.window import ChartInputError

INDEX_COLUMNS = ("image", "symbol", "interval", "first_open_time", "last_open_time", "last_close", "next_close")


@dataclass(frozen=True)
class DatasetSummary:
    images: int
    index: Path


def warmup_for(preset: ChartPreset) -> int:
    return max((LOOKBACK.get(n, 0) for n in preset.indicator_names), default=0)


def build_dataset(
    input_path: str | Path,
    out_dir: str | Path,
    preset: ChartPreset,
    stride: int = 1,
    workers: int | None = None,
    limit: int | None = None,
    symbol: str | None = None,
    interval: str | None = None,
    progress: bool = True,
) -> DatasetSummary:
    if stride < 1:
        raise ChartInputError(f"stride must be >= 1, got {stride}")
    path = Path(input_path)
    if symbol is None or interval is None:
        s, i = infer_symbol_interval(path)
        symbol, interval = symbol or s, interval or i
    frame = read_kline_frame(path, symbol, interval)
    full = window_from_frame(frame, symbol, interval, preset)
    first_end = preset.window + warmup_for(preset)
    ends = list(range(first_end, len(full) + 1, stride))
    if limit is not None:
        ends = ends[:limit]
    if not ends:
        raise ChartInputError(
            f"{path}: {len(full)} candles; a {preset.window}-candle window with warm-up needs {first_end}"
        )
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    jobs = []
    rows = []
    for end in ends:
        w = full.slice(end - preset.window, end)
        name = f"images/{symbol}-{interval}-{preset.name}-{w.last_open_time}.png"
        jobs.append((w, preset, str(out / name)))
        next_close = float(full.close[end]) if end < len(full) else ""
        rows.append((name, symbol, interval, w.first_open_time, w.last_open_time, float(w.close[-1]), next_close))
    with RenderPool(workers) as pool, Progress(
        TextColumn(f"{symbol} {interval} {preset.name}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        disable=not progress,
    ) as bar:
        task = bar.add_task("render", total=len(jobs))
        for _ in pool.render_files(jobs):
            bar.advance(task)
    index = out / "index.csv"
    with open(index, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(INDEX_COLUMNS)
        writer.writerows(rows)
    return DatasetSummary(images=len(jobs), index=index)
