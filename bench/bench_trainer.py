"""Trainer benchmark: training samples/s per model and device, and onnxruntime vs torch eager
inference latency (batch 1 and 64), measured in one run. Prints numbers and ratios, asserts nothing.

    .venv/bin/python bench/bench_trainer.py [--batches 20] [--repeats 50] [--device auto]

Real candles: tests/data/klines/BTCUSDT-15m-2023-04-01-head3000.csv.gz (3,000 shipped rows) built
into each kind's dataset; the models are the seeds' shapes with fresh weights (speed does not depend
on what they learned). On a machine with CUDA the training rows are measured on CPU and on the GPU.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from services.trainer.datasets import BuildSpec, build_dataset
from services.trainer.datasets.sequence import SequenceDataset
from services.trainer.export import check_onnx, export_onnx
from services.trainer.loop import LoopConfig, fit
from services.trainer.models import SEED_CONFIGS, ServingGraph, WeightedMSE, build_core

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "klines" / "BTCUSDT-15m-2023-04-01-head3000.csv.gz"


def train_speed(ds: SequenceDataset, kind: str, device: str, batches: int) -> float:
    cfg = SEED_CONFIGS[kind]
    train = ds.split("train")
    y = ds.scale_targets(train.targets)
    bs = cfg["batch_size"]

    def batches_of(rng):
        order = rng.permutation(len(train))
        for i in range(0, len(order), bs):
            idx = order[i : i + bs]
            yield torch.from_numpy(train.features[train.window_index(idx, ds.lookback)]), torch.from_numpy(y[idx])

    model = build_core(kind, len(ds.features), len(ds.horizons), len(ds.targets))
    loss = WeightedMSE([cfg["loss_weights"][t] for t in ds.targets])
    # one short epoch first: allocator and kernels warm, not counted
    fit(model, batches_of, lambda: [], loss, LoopConfig(epochs=1, max_batches=2, device=device, lr=cfg["lr"]))
    res = fit(model, batches_of, lambda: [], loss, LoopConfig(epochs=1, max_batches=batches, device=device, lr=cfg["lr"]))
    return res.train_samples_per_s


def latency(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=20, help="training batches timed per model and device")
    ap.add_argument("--repeats", type=int, default=50, help="inference calls timed per batch size")
    ap.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads (serving uses 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime as ort

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("bilstm-ohlc", "lstm-close"):
            out = Path(tmp) / kind
            build_dataset(BuildSpec(kind=kind, inputs=[str(DATA)], out=out))
            ds = SequenceDataset(out)
            print(f"\n{kind}: {len(ds.features)} features x {ds.lookback} candles -> {len(ds.horizons)} x {len(ds.targets)}")
            for dev in devices:
                name = torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"
                print(f"  training ({name}, batch {SEED_CONFIGS[kind]['batch_size']}): "
                      f"{train_speed(ds, kind, dev, args.batches):,.0f} samples/s")
            core = build_core(kind, len(ds.features), len(ds.horizons), len(ds.targets)).eval()
            graph = ServingGraph(core, ds.x_scaler.center, ds.x_scaler.scale, ds.y_scaler.center, ds.y_scaler.scale,
                                 ds.features.index("close")).eval()
            test = ds.split("test")
            windows = test.raw_features[test.window_index(np.arange(64), ds.lookback)]
            path = Path(tmp) / f"{kind}.onnx"
            export_onnx(graph, (torch.from_numpy(windows[:2]),), path, ["features"], ["forecast"])
            check = check_onnx(graph, path, {"features": windows})
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = args.threads
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            print(f"  onnx vs torch max abs diff {check['max_abs_diff']:.2e} on 64 real windows")
            for b in (1, 64):
                x = windows[:b]
                xt = torch.from_numpy(x)

                def eager():
                    with torch.no_grad():
                        graph(xt)

                t_torch = latency(eager, args.repeats)
                t_onnx = latency(lambda: sess.run(None, {"features": x}), args.repeats)
                print(f"  inference batch {b:>2}: torch eager {t_torch * 1e3:7.2f} ms, onnxruntime {t_onnx * 1e3:7.2f} ms "
                      f"-> onnxruntime is {t_torch / t_onnx:.2f}x torch")


if __name__ == "__main__":
    main()
