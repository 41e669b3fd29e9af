"""Charts/s: the fast path beside plain mplfinance, same charts, same run.

    .venv/bin/python bench/bench_charts.py [--window 200] [--charts 40] [--workers N]

Plain = ``mplfinance.plot`` building a new figure per chart and ``savefig`` to PNG
(what a straightforward service does). Fast = ``FastRenderer`` (prepared figure,
data swapped in place), one process, then ``RenderPool`` with N processes.
Also prints the pixel RMS difference between the two paths' pictures.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from libs.common.klines import read_kline_frame  # noqa: E402
from libs.charting.fast import FastRenderer  # noqa: E402
from libs.charting.figure import build_figure  # noqa: E402
from libs.charting.indicators import window_from_frame  # noqa: E402
from libs.charting.pool import RenderPool  # noqa: E402
from libs.charting.presets import ANALYSIS  # noqa: E402
from libs.charting.window import check_window  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "klines" / "BTCUSDT-15m-2023-04-01-head3000.csv.gz"


def plain_mplfinance(w, preset) -> bytes:
    h = build_figure(w, preset)  # mplfinance.plot(..., returnfig=True) with the same style and panels
    buf = io.BytesIO()
    h.fig.savefig(buf, format="png", dpi=preset.dpi)
    plt.close(h.fig)
    return buf.getvalue()


def rate(fn, items) -> float:
    t = time.perf_counter()
    for x in items:
        fn(x)
    return len(items) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--window", type=int, default=200)
    ap.add_argument("--charts", type=int, default=40)
    ap.add_argument("--width", type=int, default=ANALYSIS.width_px)
    ap.add_argument("--height", type=int, default=ANALYSIS.height_px)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    preset = ANALYSIS.sized(args.window, args.width, args.height)
    full = window_from_frame(read_kline_frame(DATA, "BTCUSDT", "15m"), "BTCUSDT", "15m", preset)
    step = max(1, (len(full) - preset.window - 40) // args.charts)
    windows = [check_window(full.slice(0, preset.window + 40 + i * step), preset.window) for i in range(args.charts)]

    fast = FastRenderer(preset)
    fast.render(windows[-1])  # prepare the figure once, as a worker does at start
    fast_rate = rate(fast.render, windows)
    plain_n = max(4, args.charts // 4)
    plain_rate = rate(lambda w: plain_mplfinance(w, preset), windows[:plain_n])

    def px(b: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(b)).convert("RGB")).astype(float)

    diffs = [float(np.sqrt(((px(fast.render(w)) - px(plain_mplfinance(w, preset))) ** 2).mean())) for w in windows[:4]]

    with RenderPool(args.workers) as pool:
        for f in [pool.submit(windows[-1], preset) for _ in range(args.workers * 2)]:
            f.result()  # every worker prepared
        t = time.perf_counter()
        for f in [pool.submit(w, preset) for w in windows]:
            f.result()
        pool_rate = len(windows) / (time.perf_counter() - t)

    print(f"chart: {preset.window} candles, {preset.width_px}x{preset.height_px}, candles+SMA+EMA+volume+MACD+RSI+patterns")
    print(f"plain mplfinance (1 core):  {plain_rate:6.2f} charts/s")
    print(f"fast path        (1 core):  {fast_rate:6.2f} charts/s   x{fast_rate / plain_rate:.1f} vs plain")
    print(f"fast path pool ({args.workers} procs): {pool_rate:6.2f} charts/s   x{pool_rate / plain_rate:.1f} vs plain 1 core")
    print(f"pixel RMS fast vs plain (0-255): max {max(diffs):.3f} over {len(diffs)} charts")


if __name__ == "__main__":
    main()
