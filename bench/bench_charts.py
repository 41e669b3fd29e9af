"""Charts/s: the fast paths beside plain mplfinance, same charts, same run.

    .venv/bin/python bench/bench_charts.py [--case analysis|dataset|all] [--window 200] [--charts 40] [--workers N]

``analysis`` (the service's chart): plain = ``mplfinance.plot`` building a new figure per chart
and ``savefig`` to PNG (what a straightforward service does); fast = ``FastRenderer`` (prepared
figure, data swapped in place), one process, then ``RenderPool`` with N processes. Also prints
the pixel RMS difference between the two paths' pictures.

``dataset`` (the chart classifier's 224 px training images, ``classifier224``, real BTCUSDT 15m
candles): plain mplfinance, ``FastRenderer`` (the path the dataset used before) and
``DirectRenderer`` (what it uses now) in interleaved rounds in one process, as charts per
wall-clock second and per CPU-second of that process (the per-core figure; less moved by other
work on a shared machine); how many of the windows came out pixel-identical; then
``build_dataset`` end to end on the whole file (indicators, render, PNG, file writes, index):
in-process (one core) with each renderer, interleaved, and with an N-process pool, per
CPU-second of the parent and all workers together (their start-up included).
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from libs.common.klines import read_kline_frame  # noqa: E402
from libs.charting import pool as pool_module  # noqa: E402
from libs.charting.direct import DirectRenderer  # noqa: E402
from libs.charting.fast import FastRenderer  # noqa: E402
from libs.charting.figure import build_figure, render_plain  # noqa: E402
from libs.charting.indicators import window_from_frame  # noqa: E402
from libs.charting.pool import RenderPool  # noqa: E402
from libs.charting.presets import ANALYSIS, CLASSIFIER224  # noqa: E402
from libs.charting.window import check_window  # noqa: E402
from services.charts.dataset import build_dataset, warmup_for  # noqa: E402

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


def rates(fn, items) -> tuple[float, float]:
    """(charts per wall-clock second, charts per CPU-second of this process)."""
    t, c = time.perf_counter(), time.process_time()
    for x in items:
        fn(x)
    return len(items) / (time.perf_counter() - t), len(items) / max(time.process_time() - c, 1e-9)


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def dataset_case(args) -> None:
    preset = CLASSIFIER224
    full = window_from_frame(read_kline_frame(DATA, "BTCUSDT", "15m"), "BTCUSDT", "15m", preset)
    first = preset.window + warmup_for(preset)
    ends = np.linspace(first, len(full), args.dataset_charts).astype(int)
    windows = [check_window(full.slice(e - preset.window, e), preset.window) for e in ends]
    fast, direct = FastRenderer(preset), DirectRenderer(preset)
    fast.render(windows[0]), direct.render(windows[0])  # prepared, as a worker is after its first chart
    plain_windows = windows[:: max(1, len(windows) // 12)][:12]
    results: dict[str, list[tuple[float, float]]] = {"plain": [], "fast": [], "direct": []}
    for _ in range(args.rounds):  # interleaved, so other load on the machine hits all three alike
        results["plain"].append(rates(lambda w: render_plain(w, preset), plain_windows))
        results["fast"].append(rates(fast.render, windows))
        results["direct"].append(rates(direct.render, windows))
    same = sum(np.array_equal(px(fast.render(w)), px(direct.render(w))) for w in windows)
    same_bytes = sum(fast.render(w) == direct.render(w) for w in windows)
    same_plain = sum(np.array_equal(px(render_plain(w, preset)), px(direct.render(w))) for w in plain_windows)

    def med(name: str, i: int) -> float:
        return statistics.median(r[i] for r in results[name])

    print(f"dataset chart: {preset.name} {preset.window} candles, {preset.width_px}x{preset.height_px}, "
          f"BTCUSDT 15m, {len(windows)} windows ({len(plain_windows)} for plain), {args.rounds} interleaved rounds, medians")
    print("                    wall charts/s   charts per CPU-s (1 core)   vs plain   vs fast")
    for name in ("plain", "fast", "direct"):
        print(f"  {name:<8} (1 proc) {med(name, 0):10.1f}   {med(name, 1):14.1f}            "
              f"x{med(name, 1) / med('plain', 1):6.1f}   x{med(name, 1) / med('fast', 1):5.2f}")
    print(f"  direct == fast pixels: {same}/{len(windows)} windows (PNG bytes equal: {same_bytes}); "
          f"direct == plain pixels: {same_plain}/{len(plain_windows)}")

    # build_dataset end to end on the whole file: in-process with each renderer, then a pool
    def build(workers: int, renderer) -> tuple[int, float, float]:
        pool_module._renderers.clear()
        saved, pool_module.renderer_for = pool_module.renderer_for, renderer
        try:
            with tempfile.TemporaryDirectory() as out:
                t, c, k = time.perf_counter(), time.process_time(), children_cpu()
                summary = build_dataset(DATA, out, preset, workers=workers, progress=False,
                                        symbol="BTCUSDT", interval="15m")
                wall = time.perf_counter() - t
                cpu = time.process_time() - c + children_cpu() - k
        finally:
            pool_module.renderer_for = saved
        return summary.images, wall, cpu

    e2e: dict[str, list[tuple[int, float, float]]] = {"fast": [], "direct": []}
    for _ in range(2):
        e2e["fast"].append(build(0, FastRenderer))
        e2e["direct"].append(build(0, DirectRenderer))
    print("  build_dataset, whole file, in-process (workers=0, one core):")
    for name in ("fast", "direct"):
        n = e2e[name][0][0]
        wall = statistics.median(r[1] for r in e2e[name])
        cpu = statistics.median(r[2] for r in e2e[name])
        print(f"    {name:<7} {n} images  {n / wall:7.1f} charts/s wall  {n / cpu:7.1f} charts per CPU-s")
    steady_pool(args, preset, full)
    n, wall, cpu = build(args.workers, pool_module.renderer_for)
    print(f"  build_dataset, whole file, pool of {args.workers} workers (direct, worker start-up included): "
          f"{n / wall:.1f} charts/s wall, {n / cpu:.1f} charts per CPU-s (parent + workers), "
          f"{n / wall / min(args.workers, os.cpu_count() or 1):.1f} charts/s wall per core")


def workers_cpu(pool: RenderPool) -> float:
    """CPU seconds the pool's live worker processes have used (Linux /proc)."""
    total = 0.0
    for pid in list(pool._pool._processes):  # ProcessPoolExecutor's pid -> process map
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total


def steady_pool(args, preset, full) -> None:
    """Prepared workers (as in a long dataset build), every window of the file to PNG files."""
    first = preset.window + warmup_for(preset)
    with RenderPool(args.workers) as pool, tempfile.TemporaryDirectory() as out:
        for f in [pool.submit(full.slice(first - preset.window, first), preset) for _ in range(args.workers * 4)]:
            f.result()
        jobs = [(full.slice(e - preset.window, e), preset, f"{out}/{e}.png") for e in range(first, len(full) + 1)]
        t, c, k = time.perf_counter(), time.process_time(), workers_cpu(pool)
        n = sum(1 for _ in pool.render_files(jobs))
        wall = time.perf_counter() - t
        cpu = time.process_time() - c + workers_cpu(pool) - k
    print(f"  pool of {args.workers} prepared workers (direct), {n} windows to files: {n / wall:.1f} charts/s wall, "
          f"{n / cpu:.1f} charts per CPU-s (parent + workers), "
          f"{n / wall / min(args.workers, os.cpu_count() or 1):.1f} charts/s wall per core")


def px(b: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", choices=("analysis", "dataset", "all"), default="all")
    ap.add_argument("--window", type=int, default=200)
    ap.add_argument("--charts", type=int, default=40)
    ap.add_argument("--dataset-charts", type=int, default=400, help="windows for the dataset case")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds for the dataset case")
    ap.add_argument("--width", type=int, default=ANALYSIS.width_px)
    ap.add_argument("--height", type=int, default=ANALYSIS.height_px)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    if args.case in ("dataset", "all"):
        dataset_case(args)
    if args.case in ("analysis", "all"):
        analysis_case(args)


def analysis_case(args) -> None:
    preset = ANALYSIS.sized(args.window, args.width, args.height)
    full = window_from_frame(read_kline_frame(DATA, "BTCUSDT", "15m"), "BTCUSDT", "15m", preset)
    step = max(1, (len(full) - preset.window - 40) // args.charts)
    windows = [check_window(full.slice(0, preset.window + 40 + i * step), preset.window) for i in range(args.charts)]

    fast = FastRenderer(preset)
    fast.render(windows[-1])  # prepare the figure once, as a worker does at start
    fast_rate = rate(fast.render, windows)
    plain_n = max(4, args.charts // 4)
    plain_rate = rate(lambda w: plain_mplfinance(w, preset), windows[:plain_n])

    def fpx(b: bytes) -> np.ndarray:
        return px(b).astype(float)

    diffs = [float(np.sqrt(((fpx(fast.render(w)) - fpx(plain_mplfinance(w, preset))) ** 2).mean())) for w in windows[:4]]

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
