"""``klinebus vlm evaluate`` (a scorecard over a chart dataset) and ``klinebus vlm tiny-model``
(a random-weight Qwen2.5-VL-shaped GGUF pair for demos, tests and speed checks)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    vlm = subparsers.add_parser("vlm", help="vision-language model chart analyses")
    sub = vlm.add_subparsers(dest="vlm_command", required=True, metavar="COMMAND")

    p = sub.add_parser("evaluate", help="analyse a chart dataset and score the calls beside baselines")
    p.add_argument("--charts", required=True, type=Path, help="folder written by `klinebus charts dataset` (index.csv, images/)")
    p.add_argument("--input", required=True, type=Path, help="the kline file the charts were drawn from")
    p.add_argument("--model", type=Path, help="GGUF text model")
    p.add_argument("--mmproj", type=Path, help="GGUF vision projector")
    p.add_argument("--remote-url", default="", help="an OpenAI-compatible server instead of --model/--mmproj")
    p.add_argument("--limit", type=int, default=None, help="the latest N charts of the index")
    p.add_argument("--flat-bps", type=float, default=5.0, help="moves smaller than this count as flat")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per chart")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: llama.cpp's default)")
    p.add_argument("--image-max-side", type=int, default=672)
    p.add_argument("--image-max-tokens", type=int, default=512)
    p.add_argument("--json", action="store_true", help="print the scorecard as JSON")
    p.set_defaults(func=run_evaluate)

    p = sub.add_parser("tiny-model", help="write a random-weight Qwen2.5-VL-shaped GGUF pair (proves paths, not quality)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--shape", choices=("tiny", "7b"), default="tiny", help="7b: Qwen2.5-VL-7B's shape in f16 (~16 GB), for speed checks")
    p.set_defaults(func=run_tiny)


def run_tiny(args: argparse.Namespace) -> None:
    from libs.llm.testing import QWEN25VL_7B, TinyShape, write_tiny_qwen25vl

    shape = QWEN25VL_7B if args.shape == "7b" else TinyShape()
    pair = write_tiny_qwen25vl(args.out, shape, name="random-qwen25vl-7b" if args.shape == "7b" else "tiny-qwen25vl")
    print(f"model  {pair.model}\nmmproj {pair.mmproj}")


def run_evaluate(args: argparse.Namespace) -> None:
    import asyncio
    import json

    from libs.common.errors import CliError
    from libs.common.klines import InvalidKline, infer_symbol_interval, read_kline_csv
    from libs.llm.models import ModelFileError, from_paths
    from libs.llm.runtime import BackendUnavailable, LocalModel, RemoteModel
    from services.vlm.analyst import Analyst
    from services.vlm.evaluate import evaluate, format_card

    if not (args.charts / "index.csv").exists():
        raise CliError(f"{args.charts} has no index.csv (write it with `klinebus charts dataset`)")
    try:
        symbol, interval = infer_symbol_interval(args.input)
        candles = read_kline_csv(args.input, symbol, interval)
    except (InvalidKline, OSError) as exc:
        raise CliError(f"{args.input}: {exc}") from None

    async def go():
        if args.remote_url:
            backend = RemoteModel(args.remote_url)
            await backend.describe()
        else:
            if not args.model or not args.mmproj:
                raise CliError("give --model and --mmproj, or --remote-url")
            backend = LocalModel(
                from_paths(args.model, args.mmproj), n_threads=args.threads or None,
                image_max_tokens=args.image_max_tokens, warmup=False,
            )
            await asyncio.to_thread(backend.load)
        try:
            analyst = Analyst(backend, timeout_s=args.timeout)
            return await evaluate(args.charts, candles, analyst, limit=args.limit, flat_bps=args.flat_bps, max_side=args.image_max_side)
        finally:
            await backend.close()

    try:
        card = asyncio.run(go())
    except (ModelFileError, BackendUnavailable) as exc:
        raise CliError(str(exc)) from None
    print(json.dumps(card.as_dict(), indent=2) if args.json else format_card(card))
