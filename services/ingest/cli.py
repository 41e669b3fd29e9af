"""``klinebus simulate`` and ``klinebus history import``."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import glob
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("simulate", help="run the Binance exchange simulator alone (replays kline files)")
    p.add_argument("--data", nargs="+", default=["data/klines/*.csv.gz"], help="kline files or globs (SYMBOL-INTERVAL-*.csv[.gz]|.zip)")
    p.add_argument("--speed", type=float, default=60.0, help="simulated seconds per real second (default 60)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback; 0.0.0.0 in a container)")
    p.add_argument("--port", type=int, default=9443, help="port (0: any free one)")
    p.add_argument("--limit", type=int, default=None, help="candles per stream to replay")
    p.add_argument("--updates", type=int, default=2, help="in-progress updates per candle (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the in-progress price paths (same seed, same replay)")
    p.set_defaults(func=_cmd_simulate)

    h = subparsers.add_parser("history", help="kline history in the Parquet archive")
    hs = h.add_subparsers(dest="history_command", required=True)
    i = hs.add_parser("import", help="import data.binance.vision zips (checksummed), top up over REST")
    i.add_argument("--symbols", required=True, help="comma-separated, e.g. BTCUSDT,ETHUSDT")
    i.add_argument("--intervals", default="1m", help="comma-separated (default 1m)")
    i.add_argument("--start", required=True, type=dt.date.fromisoformat, help="first UTC day, YYYY-MM-DD")
    i.add_argument("--end", required=True, type=dt.date.fromisoformat, help="last UTC day, YYYY-MM-DD (inclusive)")
    i.add_argument("--archive", default=None, help="archive root (default KLINEBUS_ARCHIVE_URL or <data_dir>/archive)")
    i.add_argument("--no-rest", action="store_true", help="zips only, no REST top-up")
    i.add_argument("--source", choices=("binance", "yahoo"), default="binance",
                   help="binance (default) or yahoo: Yahoo Finance bars into their own archive (<archive>-yahoo)")
    i.add_argument("--yahoo-url", default=None, help="--source yahoo: chart API base URL (default: through yfinance)")
    i.set_defaults(func=_cmd_history_import)
    c = hs.add_parser("compact", help="merge each month's part files into one (safe beside running writers)")
    c.add_argument("--archive", default=None, help="archive root (default KLINEBUS_ARCHIVE_URL or <data_dir>/archive)")
    c.add_argument("--min-parts", type=int, default=2, help="compact months with at least this many parts (default 2)")
    c.set_defaults(func=_cmd_history_compact)


def _cmd_simulate(args: argparse.Namespace) -> None:
    from libs.common.errors import CliError
    from services.ingest.simulator import ExchangeSimulator, load_candles

    paths = sorted({p for pattern in args.data for p in glob.glob(pattern)})
    if not paths:
        raise CliError(f"no kline files match {' '.join(args.data)}")
    candles = load_candles(paths, limit=args.limit)

    async def main() -> None:
        async with ExchangeSimulator(candles, speed=args.speed, updates_per_candle=args.updates, host=args.host, port=args.port, seed=args.seed) as sim:
            print(f"simulator: websocket {sim.ws_url}  REST {sim.rest_url}  ({len(candles)} streams, x{args.speed:g})")
            print(f"  export KLINEBUS_BINANCE_WS_URL={sim.ws_url} KLINEBUS_BINANCE_REST_URL={sim.rest_url}")
            await sim.wait_done()
            print("replay done; REST stays up until Ctrl-C")
            await asyncio.Event().wait()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass


def _cmd_history_import(args: argparse.Namespace) -> None:
    if args.source == "yahoo":
        from services.ingest.yahoo import run_cli

        return run_cli(args)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from libs.common.errors import CliError
    from libs.common.settings import load_settings, parse_csv_list
    from services.ingest.settings import IngestSettings
    from libs.common.archive import ParquetArchive
    from services.ingest.history import HistoryImporter
    from services.ingest.rest import RestKlines

    if args.end < args.start:
        raise CliError(f"--end {args.end} is before --start {args.start}")
    settings = load_settings(
        IngestSettings, symbols=parse_csv_list(args.symbols), intervals=parse_csv_list(args.intervals)
    )
    root = args.archive or settings.archive_root()
    rest = None if args.no_rest else RestKlines(settings.binance_rest_url, settings.rest_weight_budget)
    importer = HistoryImporter(ParquetArchive(root), settings.history_base_url, rest)

    async def main() -> dict:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
            task = bar.add_task("planning", total=None)

            def progress(what: str, n: int, total: int) -> None:
                bar.update(task, description=what, completed=n, total=total)

            try:
                return await importer.run(settings.symbols, settings.intervals, args.start, args.end, progress=progress)
            finally:
                if rest is not None:
                    await rest.close()

    added = asyncio.run(main())
    for (symbol, interval), n in added.items():
        print(f"{symbol} {interval}: {n} new candles")
    print(f"archive: {Path(root) if '://' not in root else root}")


def _cmd_history_compact(args: argparse.Namespace) -> None:
    from libs.common.archive import ParquetArchive
    from libs.common.errors import CliError
    from libs.common.settings import load_settings
    from services.ingest.settings import IngestSettings

    if args.min_parts < 2:
        raise CliError(f"--min-parts must be at least 2, got {args.min_parts}")
    root = args.archive or load_settings(IngestSettings).archive_root()
    merged = ParquetArchive(root).compact_all(min_parts=args.min_parts)
    for (symbol, interval, month), n in sorted(merged.items()):
        print(f"{symbol} {interval} {month}: {n} parts -> 1")
    print(f"archive: {root} ({len(merged)} months compacted)")
