"""Inference benchmark: N symbols closing together, answered by the seed-002 BiLSTM package beside
persistence, measured in one run; float graph vs the package's int8 fast variant; and the chart
classifier batched vs one chart at a time.

    .venv/bin/python bench/bench_inference.py [--symbols 1000] [--bursts 5] [--epochs 3] [--charts 64]

The package is trained by the trainer's code on shipped candles (seed shapes: 60 x 13, BiLSTM
128-64-32) for ``--epochs`` epochs, so its forecasts mean something for the accuracy block; the
trainer exports the int8 variant beside the float graph (services/trainer/export.py). Prints:

* session: float vs int8 on the same 1,000 windows, one and two intra-op threads, in micro-batches
  of 64 (serving's default) and as one call, interleaved repetitions, ratios; torch eager for scale;
* accuracy: on held-out real candles (the package's test slice, and everything after its training
  range), the next close's MAE of float, int8 and persistence, and how far int8 is from float;
* engine: close -> forecast handed to publishing, per candle, for a burst of N candles through
  the micro-batcher (p50, p99, max, and the whole burst), float and int8 runs alternated;
* service: the real service on an embedded Redis: N features events XADDed at once -> each
  forecast on predictions.v1 (from the entries' times), including the bus edge, float then int8
  with one and two session calls at once (``--calls``), ``--rounds`` times alternated;
* charts: the default chart classifier (small ViT + MiniLM, trained one step on rendered charts of
  the shipped candles): ``--charts`` charts through ``ChartModel.predict_many`` (one session call)
  vs ``predict`` one at a time, and through the ``ChartBatcher``, interleaved, ratio.

Absolute times and ratios, no thresholds.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BTC_15M = ROOT / "tests" / "data" / "klines" / "BTCUSDT-15m-2023-04-01-head3000.csv.gz"


def pct(xs, q):
    return float(np.percentile(np.asarray(xs), q))


def train_package(root: Path, epochs: int = 1):
    from services.trainer.datasets import BuildSpec, build_dataset
    from services.trainer.jobs import TrainOptions, run_training

    build_dataset(BuildSpec(kind="bilstm-ohlc", inputs=[str(BTC_15M)], out=root / "ds"))
    one_step = epochs <= 0  # one batch: enough for speed, not for accuracy
    return run_training(root / "ds", TrainOptions(registry=str(root / "reg"), epochs=1 if one_step else epochs, device="cpu",
                                                  max_batches=1 if one_step else None, patience=max(epochs, 1) + 1)).published


def float_only(spec):
    """The same package's serving spec without its fast variant: OnnxModel then runs model.onnx."""
    meta = spec.meta.model_copy(update={"config": {k: v for k, v in spec.meta.config.items() if k != "fast_model"}})
    return type(spec)(**{**spec.__dict__, "meta": meta})


def timed_interleaved(fns: dict, reps: int) -> dict[str, float]:
    """Median seconds of each callable, the callables run in turn ``reps`` times (after one warm call
    each), so load from other work on the machine falls on all of them alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: float(np.median(v)) for k, v in times.items()}


def features_rows(n_rows: int):
    """Real bilstm-13-v1 feature rows of the shipped BTCUSDT 15m candles (warm ones only)."""
    import pandas as pd

    from libs.indicators.batch import compute_frame
    from libs.indicators.feature_sets import get_feature_set

    fs = get_feature_set("bilstm-13-v1")
    frame = compute_frame(pd.read_csv(BTC_15M), fs.features, interval_ms=900_000).dropna()
    return fs, frame.iloc[:n_rows]


def bench_session(published, n: int, reps: int = 5) -> None:
    import onnxruntime as ort
    import torch

    from libs.common.model_package import FAST_MODEL_FILE, MODEL_FILE
    from services.inference.model_runner import session_options
    from services.trainer.models import build_core

    meta = published.meta
    fs, frame = features_rows(meta.lookback + n)
    feats = frame[list(meta.features)].to_numpy(np.float64)
    windows = np.stack([feats[i:i + meta.lookback] for i in range(n)])
    name = meta.inputs[0].name
    folder = Path(published.uri)
    sess = {(v, t): ort.InferenceSession(str(folder / f), session_options(t), providers=["CPUExecutionProvider"])
            for v, f in (("float", MODEL_FILE), ("int8", FAST_MODEL_FILE)) for t in (1, 2)}

    def chunks(s, size):
        return lambda: [s.run(None, {name: windows[i:i + size]}) for i in range(0, n, size)]

    fns = {(v, t, size): chunks(s, size) for (v, t), s in sess.items() for size in (64, n)}
    torch.set_num_threads(1)
    core = build_core("bilstm-ohlc", len(meta.features), 1, 4).eval()
    x32 = torch.from_numpy(windows.astype(np.float32))
    with torch.no_grad():
        got = timed_interleaved({**fns, "torch": lambda: core(x32)}, reps)
    print(f"session, batch of {n} windows [{n}, {meta.lookback}, {len(meta.features)}], median of {reps} interleaved runs "
          f"(torch eager, one thread, whole batch: {got['torch'] * 1e3:.1f} ms):")
    for t in (1, 2):
        for size in (64, n):
            f, q = got[("float", t, size)], got[("int8", t, size)]
            print(f"  {t} thread(s), calls of {size:4d}: float {f * 1e3:7.1f} ms   int8 {q * 1e3:7.1f} ms   "
                  f"int8/float {q / f:.2f}x ({f / q:.2f}x faster)")
    base = got[("float", 1, 64)]
    print(f"  int8 with 2 threads, calls of 64 vs float with 1 thread: {got[('int8', 2, 64)] / base:.2f}x")


def bench_accuracy(published) -> None:
    """The accuracy cost of the int8 variant on held-out real candles: the next close's MAE."""
    import onnxruntime as ort

    from libs.common.model_package import FAST_MODEL_FILE, MODEL_FILE

    meta = published.meta
    _, frame = features_rows(10**9)
    feats = frame[list(meta.features)].to_numpy(np.float64)
    t = frame["open_time"].to_numpy()
    c, L = meta.features.index("close"), meta.lookback
    out = meta.targets.index("close")
    folder = Path(published.uri)
    run = {v: ort.InferenceSession(str(folder / f), providers=["CPUExecutionProvider"])
           for v, f in (("float", MODEL_FILE), ("int8", FAST_MODEL_FILE))}
    check = meta.evaluation.get("export_check", {})
    print(f"accuracy of the int8 variant ({meta.name}, trained {meta.config['fit']['epochs_run']} epoch(s); the trainer's "
          f"check on {int(check.get('samples', 0))} test windows: mean |int8-float| {check.get('fast_mean_diff_vs_move', float('nan')):.2%} "
          f"of the forecast's move, bound {check.get('fast_bound_mean_vs_move', float('nan')):.0%}):")
    for label, start in (("test slice", meta.ranges.test.start), ("after the training range", meta.ranges.validation.start)):
        ends = [e for e in range(L - 1, len(feats) - 1) if t[e - L + 1] >= start]
        w = np.stack([feats[e - L + 1:e + 1] for e in ends])
        last, actual = w[:, -1, c], feats[[e + 1 for e in ends], c]
        f, q = (run[v].run(None, {meta.inputs[0].name: w})[0][:, 0, out] for v in ("float", "int8"))
        mae = {k: float(np.mean(np.abs(v - actual))) for k, v in (("float", f), ("int8", q), ("persistence", last))}
        d = np.abs(q - f)
        print(f"  {label} ({len(w)} windows, BTCUSDT 15m): next-close MAE float {mae['float']:.3f}  int8 {mae['int8']:.3f}  "
              f"persistence {mae['persistence']:.3f}  (int8 - float {mae['int8'] - mae['float']:+.4f}, "
              f"{(mae['int8'] - mae['float']) / mae['float']:+.3%}); |int8 - float| mean {d.mean():.4f} max {d.max():.4f} "
              f"= {d.mean() / np.mean(np.abs(f - last)):.2%} of the float forecast's mean move")


def burst_events(meta, symbols: list[str], candle: int):
    from libs.common.contracts import FeaturesEvent

    _, frame = features_rows(meta.lookback + 200)
    out = []
    for k, s in enumerate(symbols):
        row = frame.iloc[(candle + k) % len(frame)]
        out.append(FeaturesEvent(symbol=s, interval="15m", open_time=int(row["open_time"]), close=float(row["close"]),
                                 feature_set="bilstm-13-v1", values={c: float(row[c]) for c in frame.columns if c != "open_time"},
                                 warm=True))
    return out


async def bench_engine(published, n: int, bursts: int, rounds: int = 2) -> None:
    """Float and int8 engines alternated ``rounds`` times, ``bursts`` bursts each."""
    res: dict[str, tuple[list, list]] = {"float": ([], []), "int8": ([], [])}
    for _ in range(rounds):
        for variant in ("float", "int8"):
            lat, whole = await engine_run(published, n, bursts, variant)
            res[variant][0].extend(lat)
            res[variant][1].extend(whole)
    print(f"engine, {n} symbols closing together, {rounds} x {bursts} bursts per variant, alternated "
          f"(close handed over -> forecast to publish):")
    for variant, (lat, whole) in res.items():
        print(f"  {variant:5s}: per candle p50 {pct(lat, 50) * 1e3:.1f} ms  p99 {pct(lat, 99) * 1e3:.1f} ms  "
              f"max {max(lat) * 1e3:.1f} ms; whole burst p50 {pct(whole, 50) * 1e3:.1f} ms")
    print(f"  int8/float whole burst p50 {pct(res['int8'][1], 50) / pct(res['float'][1], 50):.2f}x")


async def engine_run(published, n: int, bursts: int, variant: str):
    from prometheus_client import CollectorRegistry

    from libs.common import model_package as mp
    from libs.common.telemetry import ServiceMetrics
    from services.inference.package import spec_from_package
    from services.inference.server import Callables, Config, Inference, load_model

    meta = published.meta
    symbols = [f"S{i:04d}USDT" for i in range(n)]
    done: dict[tuple[str, int], float] = {}

    async def sink(events, *key):
        t = time.perf_counter()
        for e in events:
            done[(e.symbol, e.open_time, e.model)] = t

    async def nothing(*a, **k):
        return None

    eng = Inference(Config(max_batch=64, max_wait_ms=2), ServiceMetrics("inference", CollectorRegistry()),
                    Callables(sink, nothing, nothing, nothing))
    spec = spec_from_package(mp.verify_package(published.uri), published.uri)
    spec = type(spec)(**{**spec.__dict__, "pairs": None})  # serve every benchmark symbol
    if variant == "float":
        spec = float_only(spec)
    eng.needs_capacity(meta.lookback)
    model = load_model(spec)
    assert model.runner.variant == ("fast" if variant == "int8" else "float"), model.runner.variant
    eng.install(model)
    eng.start()
    _, frame = features_rows(meta.lookback + 200)
    cols = [c for c in frame.columns if c != "open_time"]
    for s in symbols:  # history: every symbol's window is full before the bursts
        for i in range(meta.lookback):
            row = frame.iloc[i]
            eng.windows.push(s, "15m", int(row["open_time"]), float(row["close"]), "bilstm-13-v1", {c: float(row[c]) for c in cols})
    lat, whole = [], []
    for b in range(bursts):
        events = [ev.model_copy(update={"open_time": int(frame.iloc[meta.lookback + b]["open_time"])})
                  for ev in burst_events(meta, symbols, meta.lookback + b)]
        done.clear()
        t0 = time.perf_counter()
        for ev in events:
            eng.on_features(ev)
        while len(done) < n:
            await asyncio.sleep(0.0005)
        whole.append(max(done.values()) - t0)
        lat += [t - t0 for t in done.values()]
    await eng.stop()
    return lat, whole


async def bench_service(published, registry: Path, n: int, bursts: int, threads: int = 1, max_batch: int = 64,
                        variant: str = "int8", calls: int = 2) -> float:
    from libs.common import model_package as mp
    from libs.common import topics
    from libs.common.bus import DATA_FIELD, redis_client
    from libs.common.redis_server import EmbeddedRedis
    from services.inference import app
    from services.inference.settings import InferenceSettings

    meta = published.meta
    symbols = [f"S{i:04d}USDT" for i in range(n)]
    # A unified package serving every benchmark symbol: the same graph, its pairs widened.
    import json
    import shutil

    pkg = Path(published.uri)
    wide = registry / "bench-unified" / "1"
    shutil.rmtree(registry / "bench-unified", ignore_errors=True)
    shutil.copytree(pkg, wide)
    doc = json.loads((wide / "klinebus.json").read_text())
    doc.update(name="bench-unified", serves=[{"symbol": s, "interval": "15m"} for s in symbols], promoted=True)
    if variant == "float":  # the same package without its fast variant: the service runs model.onnx
        doc["config"].pop("fast_model", None)
        (wide / mp.FAST_MODEL_FILE).unlink()
    (wide / "klinebus.json").write_text(json.dumps(doc))
    mp.write_manifest(wide)
    with tempfile.TemporaryDirectory() as data, EmbeddedRedis(Path(data) / "redis", persistent=False) as server:
        url = server.url
        settings = InferenceSettings(data_dir=Path(data), redis_url=url, consumer_name="bench", model_dir=str(registry),
                                     log_level="WARNING", session_threads=threads, max_batch=max_batch,
                                     session_calls=calls)
        # Built before the service starts: it shares this event loop, and seconds of event building
        # would starve its lease renewals.
        hist = [burst_events(meta, symbols, i) for i in range(meta.lookback + bursts)]
        rt = app.create(settings, url)
        await rt.start(http=False)
        client = redis_client(url)
        key_f, key_p = topics.stream_key(topics.FEATURES), topics.stream_key(topics.PREDICTIONS)
        _, frame = features_rows(meta.lookback + 200)
        try:
            lat, whole = [], []
            for i in range(meta.lookback + bursts):
                events = [ev.model_copy(update={"open_time": int(frame.iloc[i]["open_time"])}) for ev in hist[i]]
                start_len = await client.xlen(key_p)
                newest = await client.xrevrange(key_p, count=1)
                after = "(" + newest[0][0].decode() if newest else "-"
                pipe = client.pipeline(transaction=False)
                for ev in events:
                    pipe.xadd(key_f, {DATA_FIELD: ev.to_json()})
                ids = await pipe.execute()
                t0 = min(int(x.decode().split("-")[0]) for x in ids)
                want = n * (2 if i >= meta.lookback - 1 else 1)  # persistence always, the BiLSTM once windows are full
                while await client.xlen(key_p) < start_len + want:
                    await asyncio.sleep(0.002)
                if i < meta.lookback:
                    continue
                # Only this burst's entries: reading the whole stream would stall the service's loop.
                entries = await client.xrange(key_p, min=after, max="+")
                times = [int(e[0].decode().split("-")[0]) - t0 for e in entries
                         if b'"bench-unified"' in e[1][DATA_FIELD.encode()]]
                lat += times
                whole.append(max(times))
        finally:
            await client.aclose()
            await rt.stop()
    print(f"service on an embedded Redis, {variant} ({calls} session call(s) at once x {threads} thread(s), max_batch "
          f"{max_batch}), {n} symbols closing "
          f"together, {bursts} bursts (XADD of the features -> the forecast's entry on predictions.v1, bus edge included):")
    print(f"  per candle p50 {pct(lat, 50):.0f} ms  p99 {pct(lat, 99):.0f} ms  max {max(lat):.0f} ms; "
          f"whole burst p50 {pct(whole, 50):.0f} ms")
    return pct(whole, 50)


def train_chart_classifier(root: Path):
    """The default chart classifier (small ViT + the packaged MiniLM), trained one step on charts
    rendered from the shipped BTCUSDT 15m candles by the trainer's code; and the charts."""
    from libs.charting import presets
    from libs.charting.indicators import window_from_frame
    from libs.charting.pool import RenderPool
    from services.trainer.classifier.dataset import load_index
    from services.trainer.classifier.pipeline import ClassifierOptions, train_chart_classifier as train
    from services.trainer.classifier.render import make_renderer
    from services.trainer.datasets import BuildSpec, build_dataset

    window = 10
    ds = root / "charts-ds"
    build_dataset(BuildSpec(
        kind="chart-classifier", inputs=[str(BTC_15M)], out=ds, symbols=["BTCUSDT"], intervals=["15m"],
        start=1_682_899_200_000, lookback=window, train_fraction=0.5, validation_fraction=0.25,
        extra={"renderer": make_renderer(window, presets, window_from_frame, RenderPool), "workers": 0},
    ))
    result = train(ds, ClassifierOptions(registry=str(root / "charts-reg"), epochs=1, batch_size=8, seed=0, max_batches=1,
                                         device="cpu"))
    return ds, result.package, load_index(ds)


async def bench_charts(root: Path, n: int, reps: int = 3) -> None:
    from services.inference.batching import ChartBatcher, Job
    from services.inference.chart_models import load_chart_package
    from services.inference.charts import load_chart_model

    t = time.perf_counter()
    ds, pkg, index = train_chart_classifier(root)
    model = load_chart_model(load_chart_package(pkg.uri, None, root), 1)
    import pandas as pd

    candles = pd.read_csv(BTC_15M).set_index("open_time")
    rows = [index.iloc[i % len(index)] for i in range(n)]
    charts = [((ds / r["image_path"]).read_bytes(),
               tuple(float(candles.loc[int(r["open_time"]), k]) for k in ("open", "high", "low", "close", "volume")),
               str(r["image_path"])) for r in rows]
    print(f"chart classifier {pkg.meta.name}@{pkg.version} (small ViT + MiniLM, {model.spec.image_size} px, "
          f"{model.spec.max_tokens} tokens; rendered, trained and exported in {time.perf_counter() - t:.0f} s), "
          f"{n} charts, one intra-op thread, median of {reps} interleaved runs:")
    batcher = ChartBatcher("bench", max_batch=32)

    def jobs():
        return [Job(model=model, symbol="BTCUSDT", interval="15m", open_time=i, window=png, last_close=c[3],
                    meta={"candle": c, "where": w}) for i, (png, c, w) in enumerate(charts)]

    loop_times: dict[str, list[float]] = {"batcher": []}
    got = timed_interleaved({"one": lambda: [model.predict(*c) for c in charts],
                             "batch": lambda: model.predict_many(charts)}, reps)
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        await batcher.answer(jobs())
        loop_times["batcher"].append(time.perf_counter() - t0)
    await batcher.stop()
    b = float(np.median(loop_times["batcher"][1:]))
    one, many = got["one"], got["batch"]
    same = all(abs(a.next_close - o.next_close) <= 1e-6 * abs(o.next_close) for a, o in
               zip(model.predict_many(charts[:8]), [model.predict(*c) for c in charts[:8]]))
    print(f"  one at a time {one * 1e3:7.1f} ms ({one / n * 1e3:.1f} ms/chart)   predict_many (one call) {many * 1e3:7.1f} ms   "
          f"batched/one-by-one {many / one:.2f}x ({one / many:.2f}x faster)")
    print(f"  ChartBatcher (calls of 32, its own thread) {b * 1e3:7.1f} ms ({b / one:.2f}x one-by-one); "
          f"batched answers equal the one-by-one ones: {same}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--symbols", type=int, default=1000)
    ap.add_argument("--bursts", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=3, help="training epochs of the BiLSTM (0: one batch, as before)")
    ap.add_argument("--charts", type=int, default=64, help="charts for the chart-classifier block (0: skip it)")
    ap.add_argument("--skip-service", action="store_true")
    ap.add_argument("--only-service", action="store_true")
    ap.add_argument("--variants", default="float,int8", help="service runs, in order (float, int8)")
    ap.add_argument("--threads", type=int, default=1, help="KLINEBUS_SESSION_THREADS for the service run")
    ap.add_argument("--max-batch", type=int, default=64, help="KLINEBUS_MAX_BATCH for the service run")
    ap.add_argument("--calls", default="1,2", help="KLINEBUS_SESSION_CALLS for the int8 service runs, alternated "
                    "(float runs use the last)")
    ap.add_argument("--rounds", type=int, default=1, help="service runs per setting, alternated")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        published = train_package(root, args.epochs)
        fast = published.meta.config.get("fast_model")
        print(f"package {published.meta.name}@{published.version} trained ({published.meta.config['fit']['epochs_run']} "
              f"epoch(s)) and exported by the trainer's code in {time.perf_counter() - t:.0f} s; fast variant: "
              f"{fast['file'] if fast else 'none'}")
        if not args.only_service:
            bench_session(published, args.symbols)
            bench_accuracy(published)
            asyncio.run(bench_engine(published, args.symbols, args.bursts))
        if not args.skip_service:
            calls = [int(c) for c in args.calls.split(",")]
            runs = [(v, c) for v in args.variants.split(",") for c in (calls if v == "int8" else calls[-1:])]
            whole: dict[tuple[str, int], list[float]] = {}
            for _ in range(args.rounds):
                for v, c in runs:
                    whole.setdefault((v, c), []).append(asyncio.run(bench_service(
                        published, root / "reg", args.symbols, args.bursts, args.threads, args.max_batch, v, c)))
            p50 = {k: float(np.median(w)) for k, w in whole.items()}
            print("service whole burst p50 (median over rounds): " + ", ".join(
                f"{v} x{c} {t:.0f} ms" for (v, c), t in p50.items()))
            if ("int8", calls[-1]) in p50 and ("float", calls[-1]) in p50:
                print(f"  int8/float ({calls[-1]} call(s)) {p50[('int8', calls[-1])] / p50[('float', calls[-1])]:.2f}x")
            if len(calls) == 2 and all(("int8", c) in p50 for c in calls):
                print(f"  int8 {calls[1]} calls / {calls[0]} call(s) {p50[('int8', calls[1])] / p50[('int8', calls[0])]:.2f}x")
        if args.charts and not args.only_service:
            asyncio.run(bench_charts(root, args.charts))


if __name__ == "__main__":
    main()
