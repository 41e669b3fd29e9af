"""``klinebus features compute``: every indicator of a kline file, one Parquet column each."""

from __future__ import annotations

import argparse
from pathlib import Path

from libs.common.klines import INTERVAL_MS, InvalidKline, read_kline_frame
from libs.indicators.batch import compute_frame
from libs.indicators.feature_sets import DEFAULT_FEATURE_SET, UnknownFeatureSet, get_feature_set


def register(subparsers: argparse._SubParsersAction) -> None:
    features = subparsers.add_parser("features", help="indicator features (batch)")
    sub = features.add_subparsers(dest="features_command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "compute",
        help="write the features of a Binance kline file (CSV, CSV.GZ, ZIP or Parquet) to Parquet",
    )
    p.add_argument("--input", required=True, type=Path, help="Binance kline CSV(.gz/.zip) or archive Parquet")
    p.add_argument("--output", required=True, type=Path, help="Parquet file to write")
    p.add_argument("--feature-set", default=DEFAULT_FEATURE_SET, help=f"feature set id (default {DEFAULT_FEATURE_SET})")
    p.add_argument("--symbol", default=None, help="default: from the file name (SYMBOL-INTERVAL-...)")
    p.add_argument("--interval", default=None, help="default: from the file name; used to detect gaps")
    p.add_argument(
        "--allow-gaps",
        action="store_true",
        help="compute across missing candles (real exchange outages) instead of failing",
    )
    p.set_defaults(func=run_compute)


def run_compute(args: argparse.Namespace) -> None:
    from libs.common.errors import CliError

    try:
        feature_set = get_feature_set(args.feature_set)
        frame = read_kline_frame(args.input, args.symbol, args.interval)
        interval = args.interval
        if interval is None and "interval" in frame.columns and len(frame):
            interval = str(frame["interval"].iloc[0])
        step_ms = INTERVAL_MS.get(interval) if interval else None
        features = compute_frame(frame, feature_set.features, interval_ms=step_ms, allow_gaps=args.allow_gaps)
    except (InvalidKline, UnknownFeatureSet, ValueError) as exc:
        raise CliError(f"{args.input}: {exc}") from None
    args.output.parent.mkdir(parents=True, exist_ok=True)
    features.to_parquet(args.output, index=False)
    print(f"wrote {len(features)} rows x {len(feature_set.features)} features ({feature_set.id}) to {args.output}")
