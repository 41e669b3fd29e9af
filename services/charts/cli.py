"""``klinebus charts render`` (one chart) and ``klinebus charts dataset`` (images for the trainer)."""

from __future__ import annotations

import argparse
from pathlib import Path

from libs.common.klines import InvalidKline, infer_symbol_interval, read_kline_frame


def register(subparsers: argparse._SubParsersAction) -> None:
    charts = subparsers.add_parser("charts", help="candlestick chart images")
    sub = charts.add_subparsers(dest="charts_command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--input", required=True, type=Path, help="Binance kline CSV(.gz/.zip) or archive Parquet")
        p.add_argument("--preset", default="analysis", help="analysis (panels) or classifier224")
        p.add_argument("--window", type=int, default=None, help="candles per chart (default: the preset's)")
        p.add_argument("--width", type=int, default=None, help="pixels (default: the preset's)")
        p.add_argument("--height", type=int, default=None, help="pixels (default: the preset's)")
        p.add_argument("--symbol", default=None, help="default: from the file name (SYMBOL-INTERVAL-...)")
        p.add_argument("--interval", default=None, help="default: from the file name")

    p = sub.add_parser("render", help="render one chart of a kline file's last (or --end) candles")
    common(p)
    p.add_argument("--out", required=True, type=Path, help="PNG file to write")
    p.add_argument("--end", type=int, default=None, help="row index after the last candle shown (default: end of file)")
    p.add_argument("--plain", action="store_true", help="use plain mplfinance.plot instead of the fast path")
    p.set_defaults(func=run_render)

    p = sub.add_parser("dataset", help="render sliding windows of a kline file in parallel, with index.csv")
    common(p)
    p.add_argument("--out", required=True, type=Path, help="folder for images/ and index.csv")
    p.add_argument("--stride", type=int, default=1, help="candles between consecutive windows")
    p.add_argument("--workers", type=int, default=None, help="render processes (default: the CPUs this process may use, its CPU limit in a pod)")
    p.add_argument("--limit", type=int, default=None, help="at most this many images")
    p.set_defaults(func=run_dataset)


def _preset(args: argparse.Namespace):
    from libs.charting.presets import get_preset

    return get_preset(args.preset).sized(args.window, args.width, args.height)


def _symbol_interval(args: argparse.Namespace) -> tuple[str, str]:
    if args.symbol and args.interval:
        return args.symbol, args.interval
    s, i = infer_symbol_interval(args.input)
    return args.symbol or s, args.interval or i


def run_render(args: argparse.Namespace) -> None:
    from libs.common.errors import CliError
    from libs.charting.fast import FastRenderer
    from libs.charting.figure import render_plain
    from libs.charting.indicators import window_from_frame
    from libs.charting.window import ChartInputError, check_window

    try:
        preset = _preset(args)
        symbol, interval = _symbol_interval(args)
        frame = read_kline_frame(args.input, symbol, interval)
        if args.end is not None:
            frame = frame.iloc[: args.end]
        w = window_from_frame(frame, symbol, interval, preset)
        data = render_plain(check_window(w, preset.window), preset) if args.plain else FastRenderer(preset).render(w)
    except (ChartInputError, InvalidKline, ValueError) as exc:
        raise CliError(f"{args.input}: {exc}") from None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)
    print(f"wrote {args.out} ({preset.name}, {preset.window} candles, {preset.width_px}x{preset.height_px})")


def run_dataset(args: argparse.Namespace) -> None:
    from libs.common.errors import CliError
    from services.charts.dataset import build_dataset
    from libs.charting.window import ChartInputError

    try:
        preset = _preset(args)
        symbol, interval = _symbol_interval(args)
        summary = build_dataset(
            args.input, args.out, preset, stride=args.stride, workers=args.workers, limit=args.limit,
            symbol=symbol, interval=interval,
        )
    except (ChartInputError, InvalidKline, ValueError) as exc:
        raise CliError(f"{args.input}: {exc}") from None
    print(f"wrote {summary.images} images and {summary.index}")
