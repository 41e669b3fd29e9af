"""Features benchmark: batch vs TA-Lib and the unfused step, streaming vs talipp, measured in one run.

    .venv/bin/python bench/bench_features.py [--candles 1000000] [--keys 1000] [--repeat 3] [--only batch|stream]

Real candles (data/klines: BTCUSDT 1m, the 2,880 shipped rows) tiled to --candles. Every case,
the references included, takes turns in each of --repeat rounds (others share the cores); prints
the best time of each, its ratio to TA-Lib (batch) or events/s and the 50k/s target (streaming),
on one thread and on two (with the per-core ratio). No thresholds.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import talib

from libs.indicators import batch, kernels, streaming
from libs.indicators.batch import compute_batch, compute_matrix
from libs.indicators.streaming import StreamingEngine

DATA = Path(__file__).resolve().parents[1] / "data" / "klines" / "BTCUSDT-1m-2026-04-15_2026-04-16.csv.gz"


def load(n: int) -> dict[str, np.ndarray]:
    df = pd.read_csv(DATA)
    reps = -(-n // len(df))
    cols = {c: np.ascontiguousarray(np.tile(df[c].to_numpy(np.float64), reps)[:n]) for c in
            ("open", "high", "low", "close", "volume")}
    cols["open_time"] = np.arange(n, dtype=np.int64) * 60_000
    return cols


# The 35 of our 44 indicator outputs TA-Lib computes too (kc_middle is EMA20); the other 9
# (bb_width, bb_pctb, kc_upper/lower, cmf_20, vpt, hv_20, price/volume change) it lacks.
TALIB_OUTPUTS = (
    *(f"sma_{p}" for p in (10, 20, 50, 100, 200)), *(f"ema_{p}" for p in (10, 20, 50, 100, 200)),
    "rsi_14", "rsi_21", "macd", "macd_signal", "macd_hist", "stoch_k", "stoch_d", "roc_12", "mom_10",
    "bb_upper", "bb_middle", "bb_lower", "atr_14", "natr_14", "adx_14", "plus_di_14", "minus_di_14",
    "kc_middle", "obv", "mfi_14", "hl2", "cdl_hammer", "cdl_engulfing", "cdl_doji", "cdl_shootingstar",
)
assert len(TALIB_OUTPUTS) == 35


def talib_same_indicators(o, h, l, c, v) -> None:  # noqa: E741
    """TA-Lib computing the 35 outputs of TALIB_OUTPUTS, in 29 calls."""
    for p in (10, 20, 50, 100, 200):
        talib.SMA(c, p)
        talib.EMA(c, p)
    talib.RSI(c, 14), talib.RSI(c, 21), talib.MACD(c, 12, 26, 9)
    talib.STOCH(h, l, c, 14, 3, 0, 3, 0), talib.ROC(c, 12), talib.MOM(c, 10)
    talib.BBANDS(c, 20, 2, 2, 0), talib.ATR(h, l, c, 14), talib.NATR(h, l, c, 14)
    talib.ADX(h, l, c, 14), talib.PLUS_DI(h, l, c, 14), talib.MINUS_DI(h, l, c, 14)
    talib.OBV(c, v), talib.MFI(h, l, c, v, 14), talib.MEDPRICE(h, l)
    talib.CDLHAMMER(o, h, l, c), talib.CDLENGULFING(o, h, l, c)
    talib.CDLDOJI(o, h, l, c), talib.CDLSHOOTINGSTAR(o, h, l, c)


def best(fn, repeat: int) -> float:
    return interleaved({"x": fn}, repeat)["x"]


def interleaved(cases: dict, repeat: int) -> dict[str, float]:
    """Best time of each case, the cases taking turns in every round (others share the cores)."""
    for fn in cases.values():
        fn()  # warm (numba compile / caches)
    times: dict[str, float] = {name: float("inf") for name in cases}
    for _ in range(repeat):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name] = min(times[name], time.perf_counter() - t0)
    return times


def _with(name: str, value):
    """A wrapper running ``fn`` with ``batch.<name>`` set to ``value``, put back after."""
    def wrap(fn):
        def run():
            saved = getattr(batch, name)
            setattr(batch, name, value)
            try:
                fn()
            finally:
                setattr(batch, name, saved)
        return run
    return wrap


one_thread = _with("PARALLEL_MIN_CANDLES", 1 << 62)  # never split: one thread
# REUSE_OUTPUT on (opt-in): a fresh result reuses the previous call's dropped buffer, which stays
# kept for this case's next round; off (the default): every fresh result in a never-touched buffer.
reusing = _with("REUSE_OUTPUT", True)
new_buffer = _with("REUSE_OUTPUT", False)


def unfused(ohlcv, buf, groups=kernels.G_ALL):
    """The path before the fused loops: ``kernels.step`` per candle over one state row, one thread."""
    kernels.run_series(kernels.new_state(1), 0, *ohlcv, buf, True, groups)


def bench_batch(d: dict[str, np.ndarray], repeat: int) -> None:
    ohlcv = [d[c] for c in ("open", "high", "low", "close", "volume")]
    n = len(d["close"])
    buf = kernels.new_output(n)
    buf.fill(0.0)
    ours35 = lambda: compute_batch(*ohlcv, names=TALIB_OUTPUTS)  # noqa: E731
    cases = {
        "ref": lambda: talib_same_indicators(*ohlcv),
        "35 fresh": reusing(ours35),
        "35 fresh 1t": one_thread(reusing(ours35)),
        "35 new buf": new_buffer(ours35),
        "35 new buf 1t": one_thread(new_buffer(ours35)),
        "35 out=": lambda: compute_batch(*ohlcv, names=TALIB_OUTPUTS, out=buf),
        "35 out= 1t": one_thread(lambda: compute_batch(*ohlcv, names=TALIB_OUTPUTS, out=buf)),
        "all fresh": reusing(lambda: compute_matrix(*ohlcv)),
        "all new buf": new_buffer(lambda: compute_matrix(*ohlcv)),
        "all out=": lambda: compute_matrix(*ohlcv, out=buf),
        "all out= 1t": one_thread(lambda: compute_matrix(*ohlcv, out=buf)),
        "unfused out= 1t": lambda: unfused(ohlcv, buf),
        # the floor no kernel can beat: allocating and writing the output once
        "floor 35": lambda: np.empty((35, n)).fill(0.0),
        "floor 49": lambda: np.empty((n, kernels.N_FEATURES)).fill(0.0),
    }
    t = interleaved(cases, repeat)
    ref = t["ref"]
    labels = [
        ("ref", "TA-Lib 0.8, the same 35 outputs (29 calls, one thread)"),
        ("35 fresh", "the 35 (names=), fresh, buffer reused (opt-in), 2 threads"),
        ("35 fresh 1t", "the 35 (names=), fresh, buffer reused (opt-in), 1 thread"),
        ("35 new buf", "the 35 (names=), fresh, new buffer (default), 2 threads"),
        ("35 new buf 1t", "the 35 (names=), fresh, new buffer (default), 1 thread"),
        ("35 out=", "the 35 (names=), caller's out= buffer, 2 threads"),
        ("35 out= 1t", "the 35 (names=), caller's out= buffer, 1 thread"),
        ("all fresh", f"all {kernels.N_FEATURES} (compute_matrix), buffer reused (opt-in), 2 threads"),
        ("all new buf", f"all {kernels.N_FEATURES}, fresh, new buffer (default), 2 threads"),
        ("all out=", f"all {kernels.N_FEATURES}, out= buffer, 2 threads"),
        ("all out= 1t", f"all {kernels.N_FEATURES}, out= buffer, 1 thread"),
        ("unfused out= 1t", f"all {kernels.N_FEATURES}, out=, 1 thread, unfused step (before)"),
        ("floor 35", f"memory floor: allocate + write 35x{n:,}"),
        ("floor 49", f"memory floor: allocate + write {n:,}x{kernels.N_FEATURES}"),
    ]
    print(f"batch   {n:,} candles (validation included), best of {repeat} interleaved rounds; 'fresh': the"
          f" previous result was dropped and its buffer reused (batch.REUSE_OUTPUT=True, opt-in), 'never-touched':"
          f" a new buffer each call (the default)")
    for key, label in labels:
        secs = t[key]
        threads = 1 if ("1t" in key or key == "ref" or key.startswith("floor")) else 2
        ratio = "" if key == "ref" else f"{secs / ref:5.2f}x TA-Lib"
        per_core = f"  {secs * threads / ref:5.2f}x TA-Lib per core" if threads == 2 else ""
        print(f"batch   {label:<58s} {secs * 1e3:8.1f} ms  {ratio}{per_core}")
    print(f"batch   fused/unfused (all {kernels.N_FEATURES}, out=, 1 thread): {t['all out= 1t'] / t['unfused out= 1t']:.2f}x")


def bench_streaming(d: dict[str, np.ndarray], n_keys: int, use_keys: bool) -> float:
    n = len(d["close"])
    steps = n // n_keys
    engine = StreamingEngine("all-v1", capacity=n_keys)
    keys = [(f"S{i:05d}USDT", "1m") for i in range(n_keys)]
    rows = engine.slots(keys)
    cols = {c: d[c][: steps * n_keys].reshape(steps, n_keys) for c in ("open", "high", "low", "close", "volume")}
    ot = np.repeat(d["open_time"][:steps], n_keys).reshape(steps, n_keys)
    engine.update_slots(rows, ot[0], *(cols[c][0] for c in ("open", "high", "low", "close", "volume")))  # compile
    engine = StreamingEngine("all-v1", capacity=n_keys)
    rows = engine.slots(keys)
    t0 = time.perf_counter()
    for s in range(steps):
        args = (ot[s], cols["open"][s], cols["high"][s], cols["low"][s], cols["close"][s], cols["volume"][s])
        if use_keys:
            engine.update_many(keys, *args)
        else:
            engine.update_slots(rows, *args)
    return (time.perf_counter() - t0) / (steps * n_keys)


def bench_talipp(d: dict[str, np.ndarray], updates: int) -> float:
    from talipp.indicators import ADX, ATR, BB, EMA, MACD, NATR, OBV, ROC, RSI, SMA, KeltnerChannels, Stoch
    from talipp.ohlcv import OHLCV

    inds_close = [*(SMA(p) for p in (10, 20, 50, 100, 200)), *(EMA(p) for p in (10, 20, 50, 100, 200)),
                  RSI(14), RSI(21), MACD(12, 26, 9), ROC(12), BB(20, 2.0)]
    inds_bar = [Stoch(14, 3), ATR(14), NATR(14), ADX(14, 14), KeltnerChannels(20, 10, 2.0, 2.0), OBV()]
    bars = [OHLCV(d["open"][i], d["high"][i], d["low"][i], d["close"][i], d["volume"][i]) for i in range(updates)]
    t0 = time.perf_counter()
    for i, bar in enumerate(bars):
        c = d["close"][i]
        for ind in inds_close:
            ind.add(c)
        for ind in inds_bar:
            ind.add(bar)
    return (time.perf_counter() - t0) / updates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candles", type=int, default=1_000_000)
    ap.add_argument("--keys", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--talipp-updates", type=int, default=5000)
    ap.add_argument("--only", choices=("batch", "stream"), help="run only the batch or only the streaming part")
    args = ap.parse_args()
    d = load(args.candles)
    if args.only != "stream":
        bench_batch(d, args.repeat)
    if args.only == "batch":
        return
    best_of: dict[str, float] = {}
    for _ in range(args.repeat):  # interleaved rounds, best of each
        for name, use_keys, threaded in (("keys", True, False), ("slots", False, False), ("two", False, True)):
            saved = streaming.PARALLEL_ROWS
            streaming.PARALLEL_ROWS = threaded
            try:
                x = bench_streaming(d, args.keys, use_keys=use_keys)
            finally:
                streaming.PARALLEL_ROWS = saved
            best_of[name] = min(best_of.get(name, float("inf")), x)
    per_keys, per_slots, per_two = best_of["keys"], best_of["slots"], best_of["two"]
    per_talipp = bench_talipp(d, args.talipp_updates)
    target = 1 / 50_000
    print(f"stream  all-v1, {args.keys} keys/call, best of {args.repeat} interleaved rounds (events/s = 1/us)")
    for label, per, cores in (
        ("update_many (keys), one thread (default)", per_keys, 1),
        ("update_slots (rows cached), one thread", per_slots, 1),
        ("update_slots, two threads (PARALLEL_ROWS)", per_two, 2),
        ("talipp 2.7, 23 of the same indicators, .add() each", per_talipp, 1),
    ):
        print(f"stream  {label:<52s} {per * 1e6:8.3f} us  {1 / per:12,.0f} events/s  "
              f"{1 / per / cores:12,.0f} events/s per core  {target / per:8.1f}x the 50k/s target")
    print(f"stream  talipp/ours = {per_talipp / per_keys:.0f}x (update_many), {per_talipp / per_slots:.0f}x (slots); "
          f"two threads/one = {per_two / per_slots:.2f}x")


if __name__ == "__main__":
    main()
