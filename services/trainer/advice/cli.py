"""Command line of the advice experiment.

Wired into the trainer's commands (``klinebus dataset build --kind advice``, ``klinebus evaluate
advice``, ``klinebus train --kind advice-orpo``) and also runnable on its own, which is what a
GPU box without the rest of klinebus needs::

    python -m services.trainer.advice dataset-build --input K.csv.gz --train-range A..B --verify-range B..C --out DIR
    python -m services.trainer.advice evaluate --model M.gguf --dataset DIR [--limit N]
    python -m services.trainer.advice orpo --dataset DIR --base-model PATH_OR_HF_ID --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from libs.common.errors import CliError


def add_build_arguments(p: argparse.ArgumentParser, *, with_common: bool = True) -> None:
    """The advice dataset's options; ``with_common`` adds --input/--symbols/--out/--lookback too
    (the trainer's ``dataset build`` already has those)."""
    from services.trainer.advice import dataset as D

    if with_common:
        p.add_argument("--input", nargs="+", required=True, help="1m kline files (.csv/.csv.gz/.zip) or archive roots")
        p.add_argument("--symbols", default=None, help="comma-separated symbols to take from the inputs (default: all)")
        p.add_argument("--out", required=True, help="dataset folder to write")
        p.add_argument("--lookback", type=int, default=D.DEFAULT_LOOKBACK,
                       help=f"minutes of context per item (default {D.DEFAULT_LOOKBACK}, the seed's)")
    p.add_argument("--train-range", default=None, help="advice: START..END of training items, UTC, end excluded")
    p.add_argument("--verify-range", default=None, help="advice: START..END of verification items (after training)")
    p.add_argument("--threshold", type=float, default=None,
                   help=f"advice: BUY/SELL when the next candle moves this fraction from its open (default "
                        f"{D.DEFAULT_THRESHOLD}, Binance spot's taker fee)")
    p.add_argument("--seed", type=int, default=None,
                   help=f"advice: seed of the rejected-advice draws (default {D.DEFAULT_SEED})")
    p.add_argument("--overwrite", action="store_true", help="advice: replace an existing dataset folder")


def build(
    inputs: Sequence[str], out: str, symbols: Sequence[str] | None, lookback: int | None,
    train_range: str | None, verify_range: str | None, threshold: float | None, seed: int | None, overwrite: bool = False,
) -> dict:
    from services.trainer.advice import dataset as D

    if not train_range or not verify_range:
        raise CliError("the advice dataset needs --train-range and --verify-range (START..END, UTC, end excluded)")
    config = D.AdviceConfig(
        train=D.parse_range(train_range),
        verify=D.parse_range(verify_range),
        lookback=lookback or D.DEFAULT_LOOKBACK,
        threshold=D.DEFAULT_THRESHOLD if threshold is None else threshold,
        seed=D.DEFAULT_SEED if seed is None else seed,
    )
    return D.build(inputs, out, config, symbols, overwrite=overwrite)


def _symbols(text: str | None) -> list[str] | None:
    return [s.strip().upper() for s in text.split(",") if s.strip()] if text else None


def _cmd_build(args: argparse.Namespace) -> None:
    manifest = build(args.input, args.out, _symbols(args.symbols), args.lookback, args.train_range,
                     args.verify_range, args.threshold, args.seed, args.overwrite)
    print(f"advice dataset {args.out}: {manifest['rows']['train']} train and {manifest['rows']['verify']} verify items "
          f"({', '.join(manifest['symbols'])}); {manifest['trade_counts_note']}")


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    from services.trainer.advice import llama

    p.add_argument("--model", default=None, help="a GGUF model file")
    p.add_argument("--server", default=None, help="or an OpenAI-compatible server URL (llama.cpp / llama-cpp-python)")
    p.add_argument("--dataset", required=True, help="an advice dataset folder (klinebus dataset build --kind advice)")
    p.add_argument("--limit", type=int, default=None, help="score N verify items spread evenly over the split")
    p.add_argument("--results", default=None, help="results journal (default DATASET/results/<model>.jsonl)")
    p.add_argument("--restart", action="store_true", help="discard earlier answers instead of resuming")
    p.add_argument("--n-ctx", type=int, default=llama.DEFAULT_N_CTX, help="context window in tokens")
    p.add_argument("--n-threads", type=int, default=None, help="CPU threads (default: llama.cpp's choice)")
    p.add_argument("--n-gpu-layers", type=int, default=-1, help="layers offloaded to a GPU when there is one")
    p.add_argument("--no-cpu-repack", action="store_true",
                   help="load without llama.cpp's repacked CPU kernels (a workaround for K-quant models that crash "
                        "with a segmentation fault on some CPUs; docs/advice.md)")
    p.add_argument("--timeout", type=float, default=llama.DEFAULT_TIMEOUT_S, help="seconds per answer")
    p.add_argument("--json", action="store_true", help="print the scorecard as JSON")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from services.trainer.advice import evaluate as E
    from services.trainer.advice import llama
    from services.trainer.advice import scorecard as S

    if bool(args.model) == bool(args.server):
        raise CliError("give exactly one of --model (a GGUF file) or --server (an OpenAI-compatible URL)")
    if args.model:
        model = llama.LlamaAdviceModel.local(args.model, n_ctx=args.n_ctx, n_threads=args.n_threads,
                                             n_gpu_layers=args.n_gpu_layers, timeout_s=args.timeout,
                                             cpu_repack=not args.no_cpu_repack)
    else:
        model = llama.LlamaAdviceModel.remote(args.server, timeout_s=args.timeout)
    try:
        result = E.evaluate(model, args.dataset, limit=args.limit, results=args.results, restart=args.restart)
    finally:
        model.close()
    if args.json:
        print(json.dumps(result.card, indent=2, default=E._jsonable))
    else:
        print(S.render(result.card))
        print(f"\nresults: {result.results_path} ({result.resumed} resumed, {result.answered_now} answered now)")


def add_orpo_arguments(p: argparse.ArgumentParser, *, with_common: bool = True) -> None:
    """ORPO's options; ``with_common`` adds those ``klinebus train`` already has."""
    from services.trainer.advice import orpo

    if with_common:
        p.add_argument("--dataset", required=True, help="an advice dataset folder")
        p.add_argument("--epochs", type=float, default=orpo.DEFAULT_EPOCHS)
        p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda when present")
        p.add_argument("--batch-size", type=int, default=orpo.DEFAULT_BATCH_SIZE)
        p.add_argument("--seed", type=int, default=3)
    p.add_argument("--out", default=None, help="advice-orpo: output folder (merged model, GGUF, manifest)")
    p.add_argument("--base-model", default=orpo.DEFAULT_BASE_MODEL,
                   help=f"advice-orpo: base model, a folder or a Hugging Face id (default {orpo.DEFAULT_BASE_MODEL})")
    p.add_argument("--max-steps", type=int, default=-1, help="advice-orpo: stop after N optimiser steps")
    p.add_argument("--learning-rate", type=float, default=orpo.DEFAULT_LEARNING_RATE)
    p.add_argument("--beta", type=float, default=orpo.DEFAULT_BETA, help="advice-orpo: ORPO's odds-ratio weight")
    p.add_argument("--lora-rank", type=int, default=orpo.DEFAULT_LORA_RANK, help="advice-orpo: 0 trains every weight")
    p.add_argument("--llama-cpp", default=None, help="advice-orpo: llama.cpp checkout whose convert_hf_to_gguf.py "
                                                     "exports the GGUF (default: $LLAMA_CPP_DIR)")
    p.add_argument("--gguf-type", default="q8_0", help="advice-orpo: converter --outtype (the seed used Q8_0)")
    p.add_argument("--allow-cpu", action="store_true", help="advice-orpo: train on CPU (tiny models and tests only)")


def _cmd_orpo(args: argparse.Namespace) -> None:
    from services.trainer.advice import orpo

    if not args.out:
        raise CliError("advice-orpo needs --out (the folder for the merged model, its GGUF and its manifest)")
    result = orpo.run(orpo.OrpoOptions.from_args(args))
    print(f"advice-orpo: {result['out']}: {result['steps']} steps, final loss {result['train_loss']:.4f}; "
          f"{result['gguf_note']}")


def register_standalone(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dataset-build", help="build the advice preference dataset from 1m candles")
    add_build_arguments(p)
    p.set_defaults(func=_cmd_build)
    p = sub.add_parser("evaluate", help="score a GGUF model on the verify split beside the baselines")
    add_evaluate_arguments(p)
    p.set_defaults(func=_cmd_evaluate)
    p = sub.add_parser("orpo", help="ORPO fine-tuning on the preference pairs (GPU), exported to GGUF")
    add_orpo_arguments(p)
    p.set_defaults(func=_cmd_orpo)


def register_evaluate(evaluate_sub: argparse._SubParsersAction) -> None:
    """``klinebus evaluate advice``: one line in the trainer's ``evaluate`` registers it."""
    p = evaluate_sub.add_parser("advice", help="score a GGUF model on an advice dataset beside its baselines")
    add_evaluate_arguments(p)
    p.set_defaults(func=_cmd_evaluate)


def extend_trainer_commands(build_parser: argparse.ArgumentParser, train_parser: argparse.ArgumentParser) -> None:
    """Give the trainer's ``dataset build`` the advice options (passed on to the kind in
    ``BuildSpec.extra``) and ``train`` a ``--kind advice-orpo`` that runs the ORPO job."""
    add_build_arguments(build_parser, with_common=False)
    build = build_parser.get_default("func")

    def build_with_advice(args: argparse.Namespace) -> None:
        if args.kind == "advice":
            given = {"train_range": args.train_range, "verify_range": args.verify_range, "threshold": args.threshold,
                     "seed": args.seed, "overwrite": args.overwrite or None}
            # before the user's own --set KEY=VALUE, so those win
            args.extra = [*(f"{k}={json.dumps(v)}" for k, v in given.items() if v is not None), *args.extra]
        build(args)

    build_parser.set_defaults(func=build_with_advice)
    train_parser.add_argument("--kind", default=None, choices=["advice-orpo"],
                              help="advice-orpo: ORPO fine-tuning of an advice dataset (GPU), exported to GGUF")
    add_orpo_arguments(train_parser, with_common=False)
    train = train_parser.get_default("func")

    def train_with_advice(args: argparse.Namespace) -> None:
        if args.kind == "advice-orpo":
            args.dataset = str(args.dataset)
            args.device = None if args.device in (None, "auto") else args.device
            return _cmd_orpo(args)
        return train(args)

    train_parser.set_defaults(func=train_with_advice)


def main(argv: Sequence[str] | None = None) -> int:
    from libs.common.launch import exit_status

    parser = argparse.ArgumentParser(prog="python -m services.trainer.advice", description=__doc__.splitlines()[0])
    register_standalone(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))

    def parse_and_run() -> None:
        args = parser.parse_args(argv)
        args.func(args)

    return exit_status(parse_and_run)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
