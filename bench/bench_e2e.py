"""End to end on separate processes: the exchange simulator -> ``klinebus run ingest`` ->
klines.v1 -> ``klinebus run features`` -> features.v1 -> ``klinebus run inference`` ->
predictions.v1, on one embedded redis-server, N symbols' 1m candles closing together.

The simulator (bench/e2e_simulator.py, its own process) replays real candles under N made-up
symbols over the real Binance websocket protocol and REST on loopback, on an accelerated clock:
one 1m candle every ``--every`` seconds, every stream closing at the same moment, with Binance's
real-time rate of in-progress updates in between. Per burst size it prints:

- lost and doubled events on klines.v1, features.v1 and predictions.v1 (one event per closed
  candle per symbol, per model on predictions.v1), over every candle of the run, counted once
  every consumer group has drained and acknowledged everything;
- per-stage p50/p99 over the measured bursts: the exchange's close (the moment the simulator
  began sending a candle's closing messages) -> the klines.v1 append, klines.v1 -> features.v1,
  features.v1 -> predictions.v1 (the stream entry ids' times, all on this machine's clock), and
  the burst completion time: close -> the burst's last prediction; beside them the simulator's
  own time to send a burst's closes, ingest's lag after the last one sent, and the first burst's
  completion (every key new to every service: warm-up, first windows);
- the reference measured in the same run: the Redis floor, redis-py appending one burst's own
  klines, features and predictions payloads in three pipelined calls, and completion over it;
- CPU seconds per burst (one candle period, in-progress updates included) and peak RSS
  (VmHWM) per process: simulator, ingest, features, inference, redis-server.

    .venv/bin/python bench/bench_e2e.py [--symbols 100,1000,4000] [--every 5] [--warmup 3] [--bursts 4]
        [--updates N] [--set KLINEBUS_FEATURE_SET=skeleton-v1 ...] [--profile DIR]
        [--replicas 1,2] [--partitions 1,4]

``--replicas`` (features and inference replicas each) and ``--partitions`` (``KLINEBUS_PARTITIONS``
for every service) run every size under each combination; CPU is then reported per service (its
replicas summed) and per replica, which is what docs/capacity.md's plan divides by.

Every service runs with its default settings, except where the harness must point it
(Redis URL, data folder, simulator URLs, the symbol list, the 1m interval) and one:
``KLINEBUS_INITIAL_BACKFILL_CANDLES=0`` for ingest, since a first deployment's REST history is
bound by Binance's request weight (2 per stream against the default 3,000-per-minute budget:
4,000 new streams wait ~3 minutes for it), which is not what this measures; ``--set`` puts it
back. ``--profile DIR`` records py-spy collapsed stacks (flamegraph.pl input) of ingest,
features and inference during the measured bursts (needs py-spy beside the interpreter).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import orjson
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from libs.common import topics  # noqa: E402
from libs.common.bus import DATA_FIELD  # noqa: E402
from libs.common.redis_server import EmbeddedRedis  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVICES = ("ingest", "features", "inference")
PROCS = ("simulator", *SERVICES, "redis")
TOPICS = (topics.KLINES, topics.FEATURES, topics.PREDICTIONS)
SHORT = {topics.KLINES: "kl", topics.FEATURES: "ft", topics.PREDICTIONS: "pr"}
# The goals on this machine (issue 9), printed beside the figures, never asserted.
GOALS = {1000: 0.25, 4000: 1.0}
HARNESS_ENV = {"KLINEBUS_INITIAL_BACKFILL_CANDLES": "0"}


def start(service: str, url: str, folder: Path, env: dict[str, str], consumer: str = "") -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    full = {
        **os.environ, "KLINEBUS_REDIS_URL": url, "KLINEBUS_DATA_DIR": str(folder),
        "KLINEBUS_CONSUMER_NAME": consumer or service,
        "KLINEBUS_HTTP_PORT": "0", "KLINEBUS_HTTP_HOST": "127.0.0.1", **env,
    }
    log = open(folder / "run.log", "wb")  # noqa: SIM115 - the child holds it
    proc = subprocess.Popen([sys.executable, "-m", "klinebus", "run", service], cwd=REPO, env=full, stdout=log,
                            stderr=subprocess.STDOUT)
    proc.log_path = folder / "run.log"  # type: ignore[attr-defined]
    return proc


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def peak_rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class CpuSampler(threading.Thread):
    """CPU seconds of each process every 0.1 s, so any window's CPU can be read afterwards."""

    def __init__(self, pids: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.1):
            self.samples.append((time.time(), {k: cpu_seconds(p) for k, p in self.pids.items()}))

    def at(self, t: float) -> dict[str, float]:
        i = min(range(len(self.samples)), key=lambda j: abs(self.samples[j][0] - t))
        return self.samples[i][1]


def read_all(r: redis.Redis, topic: str, partitions: int) -> list[tuple[int, dict]]:
    out = []
    for key in topics.stream_keys(topic, partitions):
        start = "-"
        while True:
            rows = r.xrange(key, min=start, count=10_000)
            out += [(int(eid.split(b"-")[0]), orjson.loads(f[DATA_FIELD.encode()])) for eid, f in rows]
            if len(rows) < 10_000:
                break
            start = b"(" + rows[-1][0]
    return out


def drained(r: redis.Redis, partitions: int) -> bool:
    """Every consumer group on the three topics' streams has been handed every entry and
    acknowledged it."""
    for topic in TOPICS:
        for key in topics.stream_keys(topic, partitions):
            try:
                groups = r.xinfo_groups(key)
            except redis.ResponseError:
                continue
            last = r.xinfo_stream(key)["last-generated-id"]
            for g in groups:
                if g["pending"] or g["last-delivered-id"] != last:
                    return False
    return True


def xlen(r: redis.Redis, topic: str, partitions: int) -> int:
    return sum(r.xlen(k) for k in topics.stream_keys(topic, partitions))


def wait_until(cond, timeout: float, what: str, procs: dict[str, subprocess.Popen], fail: bool = True) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        dead = [k for k, p in procs.items() if p.poll() is not None]
        if dead:
            tails = "\n".join(f"--- {k}: {_tail(procs[k])}" for k in dead)
            raise RuntimeError(f"{', '.join(dead)} exited while waiting for {what}:\n{tails}")
        if time.monotonic() > deadline:
            if fail:
                raise TimeoutError(f"no {what} after {timeout:.0f} s")
            print(f"  (no {what} after {timeout:.0f} s: counting what arrived)", flush=True)
            return False
        time.sleep(0.05)
    return True


def _tail(p: subprocess.Popen) -> str:
    log = getattr(p, "log_path", None)
    return log.read_text(errors="replace")[-3000:] if log and log.exists() else "(no log)"


def redis_floor(r: redis.Redis, got: dict, open_time: int, repeats: int = 3) -> float:
    """The reference, in the same run on the same redis-server: seconds for redis-py to append one
    burst's klines.v1, features.v1 and predictions.v1 payloads (the run's own) to scratch streams
    in three pipelined calls, one after the other as the stages are; the best of ``repeats``."""
    bodies = [[orjson.dumps(e) for _, e in got[t] if e["open_time"] == open_time] for t in TOPICS]
    best = math.inf
    for i in range(repeats):
        t0 = time.perf_counter()
        for topic, payloads in zip(TOPICS, bodies):
            pipe = r.pipeline(transaction=False)
            for body in payloads:
                pipe.xadd(f"bench:floor:{i}:{topic}", {DATA_FIELD: body})
            pipe.execute()
        best = min(best, time.perf_counter() - t0)
    for i in range(repeats):
        r.delete(*(f"bench:floor:{i}:{topic}" for topic in TOPICS))
    return best


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def spy(pid: int, out: Path, seconds: float) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "py-spy"
    return subprocess.Popen([str(exe), "record", "-p", str(pid), "-d", str(max(1, math.ceil(seconds))), "-r", "100",
                             "-o", str(out), "-f", "raw", "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_size(n: int, args, tmp: Path, overrides: dict[str, str], replicas: int = 1, partitions: int = 1) -> dict:
    candles = args.warmup + args.bursts
    folder = tmp / f"n{n}-r{replicas}-p{partitions}"
    # Binance: a kline update per stream every 2 s, so every/2 per candle keeps its real-time rate
    updates = max(0, round(args.every / 2)) if args.updates < 0 else args.updates
    with EmbeddedRedis(folder / "redis", persistent=False) as server:
        url = server.url
        r = redis.Redis.from_url(url)
        folder.mkdir(parents=True, exist_ok=True)
        sim = subprocess.Popen(
            [sys.executable, str(REPO / "bench" / "e2e_simulator.py"), "--symbols", str(n), "--candles", str(candles),
             "--every", str(args.every), "--updates", str(updates)],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(folder / "simulator.log", "wb"),  # noqa: SIM115
        )
        procs: dict[str, subprocess.Popen] = {"simulator": sim}
        try:
            hello = orjson.loads(sim.stdout.readline() or b"null")
            if not hello:
                raise RuntimeError(f"the simulator did not start; see {folder / 'simulator.log'}")
            open_times = hello["open_times"]
            env = {"KLINEBUS_BINANCE_WS_URL": hello["ws_url"], "KLINEBUS_BINANCE_REST_URL": hello["rest_url"],
                   "KLINEBUS_SYMBOLS": ",".join(hello["symbols"]), "KLINEBUS_INTERVALS": "1m",
                   "KLINEBUS_PARTITIONS": str(partitions), **HARNESS_ENV, **overrides}
            for svc in ("features", "inference", "ingest"):
                for i in range(replicas if svc != "ingest" else 1):
                    name = f"{svc}-{i + 1}" if svc != "ingest" else svc
                    procs[name] = start(svc, url, folder / name, env, consumer=name)
            # consumers first, so the first candle is read live as every later one
            wait_until(lambda: all(any(g["name"] == svc.encode() for g in _groups(r, topic))
                                   for svc, topic in (("features", topics.KLINES), ("inference", topics.FEATURES))),
                       180, "consumer groups", procs)
            pids = {k: p.pid for k, p in procs.items()} | {"redis": server.process.pid}
            sampler = CpuSampler(pids)
            sampler.start()
            t_begin = time.time()
            sim.stdin.write(b"begin\n")
            sim.stdin.flush()
            spies = []
            if args.profile:
                # the measured bursts start after the warm-up candles (ingest subscribes first: a few seconds)
                def profile_later() -> None:
                    time.sleep(max(0.0, args.warmup * args.every))
                    for name in procs:
                        if name != "simulator":
                            spies.append(spy(procs[name].pid, Path(args.profile) / f"{name}-{n}.txt",
                                             (args.bursts + 1) * args.every + 5))
                threading.Thread(target=profile_later, daemon=True).start()
            line = sim.stdout.readline()
            if not line:
                raise RuntimeError(f"the simulator stopped mid-replay; see {folder / 'simulator.log'}")
            done = orjson.loads(line)
            closes = {int(t): v for t, v in done["closes"].items()}
            models: set[str] = set()

            def complete() -> bool:
                if xlen(r, topics.PREDICTIONS, partitions) < n * candles:
                    return False
                return drained(r, partitions)
            wait_until(complete, 120, "drained pipeline", procs, fail=False)
            drained_at = time.time()
            sampler.stopped.set()
            sampler.join()
            for p in spies:
                p.wait(timeout=60)
            rss = {k: peak_rss_mib(p) for k, p in pids.items()}
            measured = open_times[args.warmup:]
            w0 = closes[measured[0]][0] - args.every / 2
            w1 = w0 + args.bursts * args.every
            c0, c1 = sampler.at(w0), sampler.at(w1)
            per_process = {k: (c1[k] - c0[k]) / args.bursts for k in pids}
            # per service: its replicas summed (the simulator and redis are one process each)
            cpu = {k: sum(v for name, v in per_process.items() if name.split("-")[0] == k) for k in PROCS}
            rss = {k: max(v for name, v in rss.items() if name.split("-")[0] == k) for k in PROCS}
            got = {t: read_all(r, t, partitions) for t in TOPICS}
            # Redis memory per retained entry, per topic (MEMORY USAGE with every node sampled):
            # what the capacity plan multiplies by the streams' MAXLEN
            per_entry = {}
            for t in TOPICS:
                keys = topics.stream_keys(t, partitions)
                entries = sum(r.xlen(k) for k in keys)
                per_entry[t] = sum(r.memory_usage(k, samples=0) or 0 for k in keys) / max(1, entries)
            floor = redis_floor(r, got, open_times[-1])
        finally:
            if sim.poll() is None:
                try:
                    sim.stdin.write(b"stop\n")
                    sim.stdin.close()
                except OSError:
                    pass
            for k, p in procs.items():
                if k != "simulator" and p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs.values():
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
            r.close()
    res = summarize(hello["symbols"], got, closes, open_times, measured, cpu, rss, time.time() - t_begin, models,
                    done["stats"])
    res["drain_s"] = drained_at - closes[open_times[-1]][1]
    res["floor"] = floor
    res["log_lines"] = {name: sum(1 for _ in open(folder / name / "run.log", "rb")) for name in procs
                        if name != "simulator"}
    res["replicas"], res["partitions"] = replicas, partitions
    res["per_process"] = per_process
    res["bytes_per_entry"] = per_entry
    return res


def summarize(symbols, got, closes, open_times, measured, cpu, rss, wall, models, sim_stats) -> dict:
    n = len(symbols)
    want = {(s, t) for s in symbols for t in open_times}
    entry: dict[str, dict] = {}
    lost, doubled = {}, {}
    for topic in TOPICS:
        seen: dict[tuple, int] = {}
        dbl = 0
        for ms, e in got[topic]:
            key = (e["symbol"], e["open_time"]) + ((e["model"],) if topic == topics.PREDICTIONS else ())
            if topic == topics.PREDICTIONS:
                models.add(e["model"])
            if key in seen:
                dbl += 1
            else:
                seen[key] = ms
        if topic == topics.PREDICTIONS:
            expect = {(s, t, m) for s, t in want for m in models}
        else:
            expect = want
        lost[topic] = len(expect - set(seen))
        doubled[topic] = dbl + len(set(seen) - expect)  # an event for a candle that never closed is extra too
        entry[topic] = seen
    def stages(wanted: set[int]) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {"close->kl": [], "kl->ft": [], "ft->pr": []}
        for (s, t), ms in entry[topics.KLINES].items():
            if t in wanted:
                out["close->kl"].append(ms - closes[t][0] * 1000)
                if (s, t) in entry[topics.FEATURES]:
                    out["kl->ft"].append(entry[topics.FEATURES][(s, t)] - ms)
        for (s, t, _model), ms in entry[topics.PREDICTIONS].items():
            if t in wanted and (s, t) in entry[topics.FEATURES]:
                out["ft->pr"].append(ms - entry[topics.FEATURES][(s, t)])
        return out

    stage = stages(set(measured))
    first_stages = {k: max(v, default=math.nan) for k, v in stages({open_times[0]}).items()}
    completion, send_span, after_send = [], [], []
    def finished(t: int) -> float:
        preds = [ms for (s, tt, _), ms in entry[topics.PREDICTIONS].items() if tt == t]
        return max(preds) / 1000 - closes[t][0] if preds else math.nan

    first = finished(open_times[0])  # every key new to every service
    for t in measured:
        if not math.isnan(done := finished(t)):
            completion.append(done)
        send_span.append(closes[t][1] - closes[t][0])
        kls = [ms for (s, tt), ms in entry[topics.KLINES].items() if tt == t]
        if kls:
            after_send.append(max(kls) / 1000 - closes[t][1])
    return {"n": n, "lost": lost, "doubled": doubled, "stage": stage, "completion": completion,
            "send_span": send_span, "after_send": after_send, "first": first, "first_stages": first_stages, "sim": sim_stats, "cpu": cpu, "rss": rss, "models": sorted(models), "wall": wall}


def _groups(r: redis.Redis, topic: str) -> list[dict]:
    try:
        return r.xinfo_groups(topics.stream_key(topic))
    except redis.ResponseError:
        return []


def print_header() -> None:
    print(f"{'symbols':>7} {'r/p':>5} | {'lost kl/ft/pr':>13} {'dbl kl/ft/pr':>12} | {'close->kl ms':>12} {'kl->ft ms':>12} "
          f"{'ft->pr ms':>12} | {'close->last pred s':>18} {'goal':>6} | {'x floor':>7} | {'sim send ms':>11} {'last sent->kl ms':>16} {'first burst s':>13}")
    print(f"{'':>7} {'':>5} | {'':>13} {'':>12} | {'p50/p99':>12} {'p50/p99':>12} {'p50/p99':>12} | {'p50 / max':>18} "
          f"{'':>6} {'(p50)':>7} | {'p50':>11} {'p50':>16} {'(new keys)':>13}")


def label(res: dict) -> str:
    """replicas/partitions of the run"""
    return f"{res['replicas']}/{res['partitions']}"


def print_row(res: dict) -> None:
    st = res["stage"]
    lost = "/".join(str(res["lost"][t]) for t in TOPICS)
    dbl = "/".join(str(res["doubled"][t]) for t in TOPICS)
    lat = " ".join(f"{pct(st[k], 50):>5.0f}/{pct(st[k], 99):<6.0f}" for k in ("close->kl", "kl->ft", "ft->pr"))
    goal = f"<={GOALS[res['n']]:g}" if res["n"] in GOALS else "-"
    comp = res["completion"]
    print(f"{res['n']:>7} {label(res):>5} | {lost:>13} {dbl:>12} | {lat} | {pct(comp, 50):>8.3f} / {max(comp, default=math.nan):<7.3f} "
          f"{goal:>6} {pct(comp, 50) / res['floor']:>6.1f}x | {1000 * pct(res['send_span'], 50):>11.0f} {1000 * pct(res['after_send'], 50):>16.0f} "
          f"{res['first']:>13.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--symbols", default="100,1000,4000")
    ap.add_argument("--every", type=float, default=5.0, help="real seconds per 1m candle (the accelerated clock)")
    ap.add_argument("--warmup", type=int, default=3, help="candles before the measured ones (new keys, first reads)")
    ap.add_argument("--bursts", type=int, default=4, help="measured candles")
    ap.add_argument("--updates", type=int, default=-1,
                    help="in-progress updates per candle and stream (default: Binance's one per 2 s of real time)")
    ap.add_argument("--set", action="append", default=[], metavar="KLINEBUS_X=V", help="a setting for every service")
    ap.add_argument("--profile", default="", help="folder for py-spy profiles (collapsed stacks) of the measured bursts")
    ap.add_argument("--replicas", default="1", help="features and inference replicas each (a list: every one is run)")
    ap.add_argument("--partitions", default="1", help="KLINEBUS_PARTITIONS for every service (a list)")
    args = ap.parse_args()
    combos = [(int(r), int(p)) for r in args.replicas.split(",") for p in args.partitions.split(",")]
    overrides = dict(kv.split("=", 1) for kv in args.set)
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    results = []
    print(f"simulator -> ingest -> features -> inference, separate processes, one redis-server; 1m candles, "
          f"one every {args.every:g} s ({args.updates if args.updates >= 0 else round(args.every / 2)} in-progress "
          f"updates each); {args.warmup} warm-up + {args.bursts} measured bursts per size; "
          f"settings: defaults + {HARNESS_ENV | overrides}; cpus {len(os.sched_getaffinity(0))}")
    print_header()
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in args.symbols.split(",")):
            for replicas, partitions in combos:
                res = run_size(n, args, Path(tmp), overrides, replicas, partitions)
                results.append(res)
                print_row(res)
    print("goals (issue 9, reference only): close -> last prediction <= 0.25 s at 1,000 symbols, <= 1 s at 4,000; "
          "nothing lost or doubled at any size")
    print("x floor: close -> last prediction over the Redis floor measured in the same run (redis-py appending the "
          "burst's own klines, features and predictions in three pipelined calls: " + ", ".join(
              f"{r['n']}: {1000 * r['floor']:.0f} ms" for r in results) + ")")
    print(f"\n{'symbols':>7} {'r/p':>5} | CPU s per burst: " + " ".join(f"{k:>9}" for k in PROCS)
          + " | peak RSS MiB: " + " ".join(f"{k:>9}" for k in PROCS) + " | CPU ms per candle per replica")
    for res in results:
        per_candle = ", ".join(f"{k} {1000 * v / res['n']:.3f}" for k, v in sorted(res["per_process"].items())
                               if k.startswith(("features", "inference")))
        print(f"{res['n']:>7} {label(res):>5} | {'':>17}" + " ".join(f"{res['cpu'][k]:>9.2f}" for k in PROCS)
              + f" | {'':>13}" + " ".join(f"{res['rss'][k]:>9.0f}" for k in PROCS) + f" | {per_candle}")
    for res in results:
        sim = res["sim"]
        print(f"{res['n']:>7} symbols, {res['replicas']} replicas, {res['partitions']} partitions: simulator sent {sim['messages_sent']:,} messages over "
              f"{sim['connections_opened']} connections, {sim['rest_requests']} REST klines requests; every group drained and "
              f"acknowledged {res['drain_s']:.1f} s after the last close; run {res['wall']:.0f} s; first burst, slowest "
              + ", ".join(f"{k} {v:.0f} ms" for k, v in res["first_stages"].items())
              + "; log lines " + ", ".join(f"{k} {v}" for k, v in res["log_lines"].items())
              + "; bursts (s) " + " ".join(f"{c:.2f}" for c in res["completion"])
              + "; Redis bytes per entry " + ", ".join(f"{t} {b:.0f}" for t, b in res["bytes_per_entry"].items()))
    print(f"(models on predictions.v1: {', '.join(results[0]['models']) if results else '-'}; CPU over the measured "
          f"bursts, one candle period each, in-progress updates included; the simulator's send of a burst's "
          f"closes is part of close->kl)")


if __name__ == "__main__":
    main()
