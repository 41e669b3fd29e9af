"""Inference benchmark: N symbols closing together, answered by the seed-002 BiLSTM package beside
persistence, measured in one run.

    .venv/bin/python bench/bench_inference.py [--symbols 1000] [--bursts 5]

The package is trained for one step by the trainer's code on shipped candles (seed shapes: 60 x 13,
BiLSTM 128-64-32); its speed does not depend on how well it was trained. Prints:

* session: one onnxruntime call for the whole burst vs torch eager on the same batch (the same
  architecture), and both per window at batch 1;
* engine: close -> forecast handed to publishing, per candle, for a burst of N candles through
  the micro-batcher (p50, p99, max, and the whole burst);
* service: the real service on an embedded Redis: N features events XADDed at once -> each
  forecast on predictions.v1 (from the entries' times), including the bus edge.

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


def train_package(root: Path):
    from services.trainer.datasets import BuildSpec, build_dataset
    from services.trainer.jobs import TrainOptions, run_training

    build_dataset(BuildSpec(kind="bilstm-ohlc", inputs=[str(BTC_15M)], out=root / "ds"))
    return run_training(root / "ds", TrainOptions(registry=str(root / "reg"), epochs=1, max_batches=1, device="cpu")).published


def features_rows(n_rows: int):
    """Real bilstm-13-v1 feature rows of the shipped BTCUSDT 15m candles (warm ones only)."""
    import pandas as pd

    from libs.indicators.batch import compute_frame
    from libs.indicators.feature_sets import get_feature_set

    fs = get_feature_set("bilstm-13-v1")
    frame = compute_frame(pd.read_csv(BTC_15M), fs.features, interval_ms=900_000).dropna()
    return fs, frame.iloc[:n_rows]


def bench_session(published, n: int) -> None:
    import onnxruntime as ort
    import torch

    from services.trainer.models import build_core

    meta = published.meta
    fs, frame = features_rows(meta.lookback + n)
    feats = frame[list(meta.features)].to_numpy(np.float64)
    windows = np.stack([feats[i:i + meta.lookback] for i in range(n)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(Path(published.uri) / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    name = meta.inputs[0].name
    torch.set_num_threads(1)
    core = build_core("bilstm-ohlc", len(meta.features), 1, 4).eval()
    x32 = torch.from_numpy(windows.astype(np.float32))

    def timed(fn, reps):
        fn()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) / reps

    ort_batch = timed(lambda: sess.run(None, {name: windows}), 3)
    with torch.no_grad():
        torch_batch = timed(lambda: core(x32), 3)
        torch_one = timed(lambda: core(x32[:1]), 50)
    ort_one = timed(lambda: sess.run(None, {name: windows[:1]}), 50)
    print(f"session, one thread, batch of {n} windows [{n}, {meta.lookback}, {len(meta.features)}]:")
    print(f"  onnxruntime {ort_batch * 1e3:8.1f} ms   torch eager {torch_batch * 1e3:8.1f} ms   "
          f"torch/onnxruntime {torch_batch / ort_batch:5.2f}x")
    print(f"  batch 1: onnxruntime {ort_one * 1e3:.2f} ms, torch eager {torch_one * 1e3:.2f} ms; "
          f"a burst of {n} one at a time would take {ort_one * n * 1e3:.0f} ms in onnxruntime "
          f"({ort_one * n / ort_batch:.1f}x the batched call)")


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


async def bench_engine(published, n: int, bursts: int) -> None:
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
    eng.needs_capacity(meta.lookback)
    eng.install(load_model(spec))
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
    print(f"engine, {n} symbols closing together, {bursts} bursts (close handed over -> forecast to publish):")
    print(f"  per candle p50 {pct(lat, 50) * 1e3:.1f} ms  p99 {pct(lat, 99) * 1e3:.1f} ms  max {max(lat) * 1e3:.1f} ms; "
          f"whole burst p50 {pct(whole, 50) * 1e3:.1f} ms")


async def bench_service(published, registry: Path, n: int, bursts: int, threads: int = 1, max_batch: int = 64) -> None:
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
    shutil.copytree(pkg, wide)
    doc = json.loads((wide / "klinebus.json").read_text())
    doc.update(name="bench-unified", serves=[{"symbol": s, "interval": "15m"} for s in symbols], promoted=True)
    (wide / "klinebus.json").write_text(json.dumps(doc))
    with tempfile.TemporaryDirectory() as data, EmbeddedRedis(Path(data) / "redis", persistent=False) as server:
        url = server.url
        settings = InferenceSettings(data_dir=Path(data), redis_url=url, consumer_name="bench", model_dir=str(registry),
                                     log_level="WARNING", session_threads=threads, max_batch=max_batch)
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
    print(f"service on an embedded Redis ({threads} session thread(s), max_batch {max_batch}), {n} symbols closing together, {bursts} bursts "
          f"(XADD of the features -> the forecast's entry on predictions.v1, bus edge included):")
    print(f"  per candle p50 {pct(lat, 50):.0f} ms  p99 {pct(lat, 99):.0f} ms  max {max(lat):.0f} ms; "
          f"whole burst p50 {pct(whole, 50):.0f} ms")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--symbols", type=int, default=1000)
    ap.add_argument("--bursts", type=int, default=5)
    ap.add_argument("--skip-service", action="store_true")
    ap.add_argument("--only-service", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="KLINEBUS_SESSION_THREADS for the service run")
    ap.add_argument("--max-batch", type=int, default=64, help="KLINEBUS_MAX_BATCH for the service run")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        published = train_package(root)
        print(f"package {published.meta.name}@{published.version} trained and exported by the trainer's code "
              f"in {time.perf_counter() - t:.0f} s")
        if not args.only_service:
            bench_session(published, args.symbols)
            asyncio.run(bench_engine(published, args.symbols, args.bursts))
        if not args.skip_service:
            asyncio.run(bench_service(published, root / "reg", args.symbols, args.bursts, args.threads, args.max_batch))


if __name__ == "__main__":
    main()
