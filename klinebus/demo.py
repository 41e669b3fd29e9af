"""``klinebus demo``: the whole pipeline on shipped Binance candles, with no network.

It starts an embedded redis-server, the exchange simulator replaying
``data/klines`` over a real websocket on loopback, and every built service in
this process (each with its own broker, consumer group and telemetry port),
then shows the live pipeline in a table until the replay is done or Ctrl-C.
The table is read from Redis itself, as any outside subscriber would.

Before the replay it trains a forecaster on the archived history (the trainer's
real code path) and writes a tiny VLM (klinebus/demo_models.py), so inference
serves a trained ONNX model beside persistence and the vlm service reads the
charts. It also fits the trainer's ``range-vol`` model (HAR on log ranges: least
squares, a few seconds), so the table shows the next candle's range with its 80 %
interval beside the close forecast's interval, and how often each interval held.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import signal
import statistics
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from libs.common import topics
from klinebus.cli import app_module
from klinebus.demo_models import DemoModels, train_forecaster, write_vlm
from libs.common.errors import CliError
from libs.common.klines import Kline, read_kline_csv
from klinebus.pipeline import start_runtimes, stop_runtimes
from libs.common.redis_server import EmbeddedRedis

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "data" / "klines"
DEMO_INTERVAL = "1m"
CHART_EVERY_S = 3.0
# Every shipped candle before the replayed ones is archived before the replay starts (features warm
# up from it; the demo's model trains on it); at least this many: the longest warm-up (SMA/EMA 200).
MIN_HISTORY = 300
# Shown in the table when warmed up, in this order.
SHOWN_INDICATORS = ("rsi_14", "ema_20", "macd_hist", "bb_pctb", "atr_14")
STAGES = (
    topics.KLINES, topics.FEATURES, topics.PREDICTIONS, topics.SCORES, topics.CHARTS, topics.ANALYSES,
    topics.ALERTS, topics.DEAD_LETTERS,
)
# Services the demo runs when their code is built, in start order (consumers before producers).
DEMO_SERVICES = ("archive", "inference", "vlm", "charts", "features", "ingest")


def load_shipped(
    symbols: list[str], candles: int, min_history: int = 0
) -> tuple[dict[tuple[str, str], list[Kline]], dict[tuple[str, str], list[Kline]]]:
    """Each symbol's shipped candles before its last ``candles`` (already archived when the demo
    starts; at least ``min_history``) and those last ``candles`` (replayed live)."""
    past, live = {}, {}
    for symbol in symbols:
        files = sorted(SHIPPED.glob(f"{symbol}-{DEMO_INTERVAL}-*.csv.gz"))
        if not files:
            available = sorted({p.name.split("-")[0] for p in SHIPPED.glob("*.csv.gz")})
            raise CliError(f"no shipped candles for {symbol}; available: {', '.join(available)}")
        klines = read_kline_csv(files[0], symbol, DEMO_INTERVAL)
        if len(klines) < min_history + candles:
            raise CliError(
                f"{files[0].name} has {len(klines)} candles; --candles {candles} leaves fewer than the "
                f"{min_history} the demo archives first"
            )
        past[(symbol, DEMO_INTERVAL)] = klines[: len(klines) - candles]
        live[(symbol, DEMO_INTERVAL)] = klines[len(klines) - candles :]
    return past, live


@dataclass
class Board:
    """What the table shows; filled by reading the streams."""

    expected: int
    symbols: list[str]
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    last_close: dict[str, float] = field(default_factory=dict)
    indicators: dict[str, dict[str, float]] = field(default_factory=dict)
    prediction: dict[str, tuple[float, int]] = field(default_factory=dict)
    model_prediction: dict[str, tuple[float, str]] = field(default_factory=dict)
    model_band: dict[str, tuple[float, float]] = field(default_factory=dict)  # close@1 80 % interval
    model_score: dict[str, float] = field(default_factory=dict)
    # Range model: (next range, 80 % lower, upper); coverage of the 80 % intervals so far: (inside, scored).
    range_prediction: dict[str, tuple[float, float | None, float | None]] = field(default_factory=dict)
    coverage: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    analysis: dict[str, str] = field(default_factory=dict)
    last_alert: str = ""
    predictions_per_symbol: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=2000))
    last_dead_letter: str = ""
    last_chart: str = ""
    started: float = field(default_factory=time.monotonic)

    def done(self) -> bool:
        return all(self.predictions_per_symbol[s] >= self.expected for s in self.symbols)

    def made(self) -> int:
        return sum(self.predictions_per_symbol.values())

    def table(self) -> Group:
        t = Table(title="klinebus demo: live pipeline (real Binance 1m candles, simulated exchange)")
        t.add_column("symbol")
        t.add_column("last close", justify="right")
        for name in SHOWN_INDICATORS:
            t.add_column(name, justify="right")
        t.add_column("next close (persistence)", justify="right")
        t.add_column("next close (trained model)", justify="right")
        t.add_column("its 80 % interval", justify="right")
        t.add_column("model MAE / persistence", justify="right")
        t.add_column("next range [80 %] (range-vol)", justify="right")
        t.add_column("vlm reading", justify="left")
        t.add_column("predictions", justify="right")
        for s in self.symbols:
            ind = self.indicators.get(s, {})
            pred = self.prediction.get(s)
            t.add_row(
                s,
                _num(self.last_close.get(s)),
                *(_num(ind.get(n)) for n in SHOWN_INDICATORS),
                f"{pred[0]:,.4f}" if pred else "-",
                _model_cell(self.model_prediction.get(s)),
                _band_cell(self.model_band.get(s)),
                f"{self.model_score[s]:.3f}" if s in self.model_score else "-",
                _range_cell(self.range_prediction.get(s)),
                self.analysis.get(s, "-"),
                f"{self.predictions_per_symbol[s]}/{self.expected}",
            )
        stages = Table(title="events per stage (Redis stream lengths)", show_header=True)
        for stage in STAGES:
            stages.add_column(stage, justify="right")
        stages.add_column("ingest→prediction latency p50 / p95", justify="right")
        lat = sorted(self.latencies_ms)
        lat_text = (
            f"{statistics.median(lat):.1f} ms / {lat[int(0.95 * (len(lat) - 1))]:.1f} ms" if lat else "-"
        )
        stages.add_row(*(str(self.counts.get(s, 0)) for s in STAGES), lat_text)
        footer = Text(f"elapsed {time.monotonic() - self.started:5.1f}s   Ctrl-C stops cleanly", style="dim")
        held = "   ".join(f"{what} {inside}/{n} ({inside / n:.0%})" for what, (inside, n) in sorted(self.coverage.items()) if n)
        coverage = Text(f"80 % intervals held (actual inside, target 80 %): {held or 'none scored yet'}", style="green")
        parts: list[Any] = [t, coverage, stages, footer]
        if self.last_chart:
            parts.append(Text(f"last chart: {self.last_chart}", style="cyan"))
        if self.last_alert:
            parts.append(Text(f"last alert: {self.last_alert}", style="magenta"))
        if self.last_dead_letter:
            parts.append(Text(f"last dead letter: {self.last_dead_letter}", style="yellow"))
        return Group(*parts)


def _model_cell(pred: tuple[float, str] | None) -> str:
    if pred is None:
        return "-"
    value, role = pred
    return f"{_num(value)}{' (shadow)' if role == 'shadow' else ''}"


def _band_cell(band: tuple[float, float] | None) -> str:
    return "-" if band is None else f"{_num(band[0])} – {_num(band[1])}"


def _range_cell(pred: tuple[float, float | None, float | None] | None) -> str:
    if pred is None:
        return "-"
    value, lo, hi = pred
    return _num(value) + (f" [{_num(lo)} – {_num(hi)}]" if lo is not None and hi is not None else "")


def _num(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.4f}" if abs(v) < 1000 else f"{v:,.2f}"


async def watch(url: str, board: Board, stop: asyncio.Event) -> None:
    """Follow the streams with plain XREAD (no consumer group: the demo only looks)."""
    client = aioredis.Redis.from_url(url)
    last_ids = {
        topics.stream_key(t): "0-0"
        for t in (
            topics.FEATURES, topics.PREDICTIONS, topics.SCORES, topics.CHARTS, topics.ANALYSES, topics.ALERTS,
            topics.DEAD_LETTERS,
        )
    }
    try:
        while not stop.is_set():
            for stage in STAGES:
                board.counts[stage] = await client.xlen(topics.stream_key(stage))
            replies = await client.xread(last_ids, count=1000, block=200)
            for key, entries in replies or []:
                key = key.decode()
                for entry_id, fields in entries:
                    last_ids[key] = entry_id.decode()
                    event = orjson.loads(fields[b"__data__"])
                    _absorb(board, key, event)
    finally:
        await client.aclose()


def _absorb(board: Board, key: str, event: dict[str, Any]) -> None:
    if key == topics.stream_key(topics.FEATURES):
        board.last_close[event["symbol"]] = event["close"]
        board.indicators[event["symbol"]] = event["values"]
    elif key == topics.stream_key(topics.PREDICTIONS):
        s = event["symbol"]
        bands = event.get("quantiles") or {}
        if event.get("target") == "range":
            band = bands.get("range@1") or {}
            board.range_prediction[s] = (event["predicted"]["range"], band.get("0.1"), band.get("0.9"))
            return
        if event["model"] != "persistence":
            board.model_prediction[s] = (event["predicted"]["close"], event.get("role", "primary"))
            if "close@1" in bands:
                board.model_band[s] = (bands["close@1"]["0.1"], bands["close@1"]["0.9"])
            return
        board.prediction[s] = (event["predicted"]["close"], event["target_open_time"])
        board.predictions_per_symbol[s] += 1
        if event.get("kline_ingested_at"):
            board.latencies_ms.append(event["predicted_at"] - event["kline_ingested_at"])
    elif key == topics.stream_key(topics.SCORES):
        target = event.get("target", "close")
        if event.get("covered") is not None and event["horizon"] == 1:
            tally = board.coverage[f"{target}@1"]
            tally[0] += bool(event["covered"])
            tally[1] += 1
        if target == "close" and event["model"] != "persistence" and event.get("mae_ratio") is not None and event["horizon"] == 1:
            board.model_score[event["symbol"]] = event["mae_ratio"]
    elif key == topics.stream_key(topics.ANALYSES):
        board.analysis[event["symbol"]] = f"{event['trend']}/{event.get('signal') or '-'}"
    elif key == topics.stream_key(topics.ALERTS):
        board.last_alert = f"[{event['severity']}] {event['rule']}: {event['message']}"
    elif key == topics.stream_key(topics.CHARTS):
        board.last_chart = f"{event['symbol']} {event['interval']} {event['window']} candles -> {event['uri']}"
    elif key == topics.stream_key(topics.DEAD_LETTERS):
        board.last_dead_letter = f"[{event['service']}] {event['reason']}"


RANGE_KIND = "range-vol"


def train_range_model(archive_root: Path, registry: Path, data_dir: Path, symbols: list[str], interval: str,
                      console: Console) -> str:
    """The trainer's range/volatility forecaster on the same archive (HAR and EWMA fitted by least
    squares: seconds), published into the demo's registry beside the close forecaster."""
    from services.trainer.datasets import BuildSpec, build_dataset
    from services.trainer.jobs import TrainOptions, run_training

    started = time.monotonic()
    dataset = data_dir / "datasets" / f"{RANGE_KIND}-{interval}"
    # 60 / 10 / 15 / 15: train, validation (HAR or EWMA), gate (promotion, interval calibration), test.
    build_dataset(BuildSpec(kind=RANGE_KIND, inputs=[str(archive_root)], out=dataset, symbols=symbols,
                            intervals=[interval], train_fraction=0.6, validation_fraction=0.1))
    meta = run_training(dataset, TrainOptions(registry=str(registry))).published.meta
    served = "promoted" if meta.promoted else "served as shadow"
    test = (meta.evaluation or {}).get("intervals", {}).get("range@1", {}).get("model", {})
    held = f"; its 80 % range interval held {test['coverage']:.0%} of {test['n']} test candles" if test else ""
    console.print(f"  {meta.name} v{meta.version} in {time.monotonic() - started:.0f}s ({served}{held})")
    return meta.name


def built_demo_services() -> list[str]:
    out = []
    for name in DEMO_SERVICES:
        try:
            app_module(name)
        except CliError:
            continue
        out.append(name)
    if "ingest" not in out or "features" not in out or "inference" not in out:
        raise CliError(f"the demo needs ingest, features and inference; built: {', '.join(out)}")
    return out


# After the replay has ended, this long without a new prediction means something is stuck:
# stop and say so rather than wait forever.
STALL_S = 30.0


class Stalled(Exception):
    pass


class Progress:
    def __init__(self, board: Board, sim) -> None:
        self.board, self.sim = board, sim
        self.seen, self.since = -1, time.monotonic()

    def check(self, watcher: asyncio.Task) -> None:
        if watcher.done():
            watcher.result()  # re-raise what stopped it
        made = self.board.made()
        if made != self.seen:
            self.seen, self.since = made, time.monotonic()
        elif self.sim.done and time.monotonic() - self.since > STALL_S:
            raise Stalled(
                f"no new prediction for {STALL_S:.0f}s after the replay ended "
                f"({made} of {self.board.expected * len(self.board.symbols)}); stopping"
            )


async def _follow_plain(
    board: Board, stop: asyncio.Event, watcher: asyncio.Task, console: Console, progress: Progress
) -> None:
    """No terminal (CI, a log file): one progress line a second, then the final table."""
    last = -1.0
    while not stop.is_set() and not board.done():
        progress.check(watcher)
        now = time.monotonic()
        if now - last >= 1.0:
            last = now
            made = board.made()
            stages = " ".join(f"{s}={board.counts.get(s, 0)}" for s in STAGES)
            console.print(f"[{now - board.started:5.1f}s] predictions {made}/{board.expected * len(board.symbols)}  {stages}")
        await asyncio.sleep(0.25)
    console.print(board.table())


async def run_pipeline(args: argparse.Namespace, data_dir: Path, console: Console) -> Board:
    from libs.common.archive import ParquetArchive
    from services.ingest.simulator import ExchangeSimulator

    symbols = [s.strip().upper() for s in args.symbols.split(",") if s.strip()]
    past, candles = load_shipped(symbols, args.candles, MIN_HISTORY)
    # As on a deployment that has been running: history sits in the archive, so features start warm.
    archive = ParquetArchive(str(data_dir / "archive"))
    for klines in past.values():
        archive.write(klines)
    board = Board(expected=min(len(v) for v in candles.values()), symbols=symbols)
    services = built_demo_services()
    models = DemoModels()
    if not args.no_model:
        # Off the event loop: training takes a few tens of seconds of CPU.
        models.registry, models.forecaster = await asyncio.to_thread(
            train_forecaster, data_dir / "archive", data_dir, symbols, DEMO_INTERVAL, args.train_epochs, console
        )
        await asyncio.to_thread(train_range_model, data_dir / "archive", models.registry, data_dir, symbols, DEMO_INTERVAL, console)
    if "vlm" in services and not args.no_vlm:
        models.vlm_model, models.vlm_mmproj = write_vlm(data_dir, console)
    elif "vlm" in services:
        services.remove("vlm")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    running = {"live": False}

    def on_signal() -> None:
        # While the pipeline runs, stop it in order and print the summary; during start-up (or
        # a second Ctrl-C) cancel outright: every started part is still stopped on the way out.
        if running["live"] and not stop.is_set():
            stop.set()
        elif main is not None:
            main.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal)

    demo_key = f"demo-{time.strftime('%Y%m%d')}:{secrets.token_hex(32)}"  # development only, never leaves this process
    with EmbeddedRedis(data_dir / "redis") as server:
        sim = ExchangeSimulator(candles, speed=args.speed)
        await sim.start(replay=False)
        runtimes = []
        watcher: asyncio.Task | None = None
        try:
            runtimes = await start_runtimes(
                services,
                server.url,
                data_dir,
                overrides={
                    "ingest": dict(
                        binance_ws_url=sim.ws_url,
                        binance_rest_url=sim.rest_url,
                        symbols=symbols,
                        intervals=[DEMO_INTERVAL],
                    ),
                    # The replay runs ~600x real time: a chart every few seconds is every half hour
                    # of market time, as the 10-minute default is on a live 1m market.
                    "charts": dict(cadence_s=CHART_EVERY_S),
                    # An unpromoted demo model is still served, as role=shadow, so it can be watched.
                    # models.v1 / datasets.v1 are signed: the demo makes a development key for this run only
                    # (production reads KLINEBUS_CONTROL_KEYS from a Secret; docs/threat-model.md).
                    "inference": dict(control_keys=demo_key, **(dict(serve_unpromoted=True) if models.registry else {})),
                    "trainer": dict(control_keys=demo_key),
                    # Small images and one thread: the tiny model answers in about a second.
                    "vlm": dict(
                        model_path=str(models.vlm_model), mmproj_path=str(models.vlm_mmproj),
                        image_max_side=448, image_max_tokens=128, n_threads=1,
                    ),
                },
                consumer="demo",
            )
            ports = ", ".join(f"{r.name}:{r.http_port}" for r in runtimes)
            console.print(f"[dim]redis {server.url} · simulator {sim.ws_url} · telemetry {ports}[/dim]")
            await sim.begin_when_connected()
            watcher = asyncio.create_task(watch(server.url, board, stop))
            progress = Progress(board, sim)
            running["live"] = True
            if args.plain or not console.is_terminal:
                await _follow_plain(board, stop, watcher, console, progress)
            else:
                with Live(board.table(), console=console, refresh_per_second=4, transient=False) as live:
                    while not stop.is_set() and not board.done():
                        progress.check(watcher)
                        live.update(board.table())
                        await asyncio.sleep(0.25)
                    live.update(board.table())
        finally:
            stop.set()
            if watcher is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            await stop_runtimes(runtimes)
            await sim.stop()
    return board


def run_demo(args: argparse.Namespace) -> None:
    from libs.common.telemetry import setup_logging

    console = Console() if Console().is_terminal else Console(width=150)
    data_dir = Path(args.data_dir) if args.data_dir else REPO / "var" / "demo" / time.strftime("%Y%m%d-%H%M%S")
    data_dir.mkdir(parents=True, exist_ok=True)
    # Services log as text at WARNING so the live table stays readable; everything is also in Redis.
    setup_logging("WARNING", "text")
    try:
        board = asyncio.run(run_pipeline(args, data_dir, console))
    except Stalled as exc:
        raise CliError(f"demo {exc}; logs and data are in {data_dir}") from None
    except asyncio.CancelledError:
        console.print(f"demo stopped before it ran; everything it started is stopped ({data_dir})")
        raise KeyboardInterrupt from None
    console.print()
    persistence = sum(board.predictions_per_symbol.values())
    held = ", ".join(f"{what} {inside}/{n}" for what, (inside, n) in sorted(board.coverage.items()) if n)
    console.print(f"[bold]done[/bold]: {board.counts.get(topics.KLINES, 0)} closed candles -> {persistence} persistence "
                  f"and {board.counts.get(topics.PREDICTIONS, 0) - persistence} trained-model forecasts "
                  f"(80 % intervals held: {held or 'none scored'}), "
                  f"{board.counts.get(topics.SCORES, 0)} live scores, {board.counts.get(topics.CHARTS, 0)} charts, "
                  f"{board.counts.get(topics.ANALYSES, 0)} VLM analyses; "
                  f"{board.counts.get(topics.DEAD_LETTERS, 0)} dead letters.")
    console.print(f"outputs in {data_dir}:")
    for sub, what in (
        ("redis", "Redis data (append-only file): every stream, replayable"),
        ("archive", "Parquet archive of closed candles"),
        ("charts", "rendered charts (PNG)"),
        ("models", "model registry (ONNX)"),
    ):
        if (data_dir / sub).exists():
            console.print(f"  {data_dir / sub}  [dim]{what}[/dim]")
