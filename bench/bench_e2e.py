"""End to end on separate processes: bursts of N symbols closing together -> klines.v1 ->
``klinebus run features`` -> features.v1 -> ``klinebus run inference`` -> predictions.v1, on one
embedded redis-server.

The bench process plays ingest's part: each burst appends one closed 1m candle per symbol to
klines.v1 through the once-per-candle guard, in pipelined batches of 1000 (as ingest's publisher
does), so what is measured is the bus edge and the two consumers. Per burst size it prints lost
and doubled events, per-stage p50/p99 from the stream entry times (klines -> features ->
predictions), the burst's completion time (first kline appended -> last prediction appended),
and CPU seconds and peak RSS per service.

    .venv/bin/python bench/bench_e2e.py [--symbols 100,1000,4000] [--bursts 3] [--warmup-bursts 21]

``--warmup-bursts`` closes that many candles per symbol first (unmeasured): skeleton-v1 needs 20
candles before its values are warm.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from libs.common import topics  # noqa: E402
from libs.common.bus import DATA_FIELD, OncePerCandle  # noqa: E402
from libs.common.contracts import KlineEvent  # noqa: E402
from libs.common.redis_server import EmbeddedRedis  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MINUTE = 60_000
PUBLISH_BATCH = 1000
T0 = 1_776_211_200_000  # 2026-04-15 00:00 UTC, the shipped candles' first minute
CLK_TCK = os.sysconf("SC_CLK_TCK")


def start(service: str, url: str, folder: Path, **env: str) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    full = {
        **os.environ, "KLINEBUS_REDIS_URL": url, "KLINEBUS_DATA_DIR": str(folder), "KLINEBUS_CONSUMER_NAME": service,
        "KLINEBUS_HTTP_PORT": "0", "KLINEBUS_HTTP_HOST": "127.0.0.1", "KLINEBUS_LOG_LEVEL": "WARNING", **env,
    }
    log = open(folder / "run.log", "wb")  # noqa: SIM115 - the child holds it
    return subprocess.Popen([sys.executable, "-m", "klinebus", "run", service], cwd=REPO, env=full, stdout=log,
                            stderr=subprocess.STDOUT)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def candle(symbol: str, minute: int, rng: np.random.Generator) -> KlineEvent:
    t = T0 + minute * MINUTE
    o = 100 + rng.random()
    c = o + rng.normal(0, 0.5)
    return KlineEvent(symbol=symbol, interval="1m", open_time=t, close_time=t + MINUTE - 1, open=o,
                      high=max(o, c) + 0.1, low=min(o, c) - 0.1, close=c, volume=1 + rng.random())


async def burst(url: str, symbols: list[str], minute: int, rng) -> float:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    guard = OncePerCandle(client, topics.KLINES, 2_000_000)
    events = [candle(s, minute, rng) for s in symbols]
    t = time.time()
    for i in range(0, len(events), PUBLISH_BATCH):
        await guard.publish_many(events[i : i + PUBLISH_BATCH])
    await client.aclose()
    return t


def entries_after(r: redis.Redis, topic: str, after: bytes) -> list[tuple[int, dict]]:
    out, start = [], b"(" + after if after != b"0-0" else b"-"
    while True:
        rows = r.xrange(topics.stream_key(topic), min=start, count=10_000)
        out += [(int(eid.split(b"-")[0]), orjson.loads(f[DATA_FIELD.encode()])) for eid, f in rows]
        if len(rows) < 10_000:
            return out
        start = b"(" + rows[-1][0]


def last_id(r: redis.Redis, topic: str) -> bytes:
    rows = r.xrevrange(topics.stream_key(topic), count=1)
    return rows[0][0] if rows else b"0-0"


def wait_count(r: redis.Redis, topic: str, after: bytes, n: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while len(entries_after(r, topic, after)) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{topic}: fewer than {n} new events after {timeout}s")
        time.sleep(0.01)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def run_size(n: int, bursts: int, warmup: int, tmp: Path) -> dict:
    rng = np.random.default_rng(n)
    symbols = [f"S{i:05d}USDT" for i in range(n)]
    with EmbeddedRedis(tmp / f"redis-{n}", persistent=False) as server:
        url = server.url
        r = redis.Redis.from_url(url)
        env = {"KLINEBUS_FEATURE_SET": "skeleton-v1", "KLINEBUS_WARMUP_SOURCE": "none"}
        procs = {"features": start("features", url, tmp / f"features-{n}", **env),
                 "inference": start("inference", url, tmp / f"inference-{n}")}
        try:
            deadline = time.monotonic() + 120
            while not all(any(g["name"] == svc.encode() for g in _groups(r, topic))
                          for svc, topic in (("features", topics.KLINES), ("inference", topics.FEATURES))):
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs.values()):
                    raise RuntimeError("services did not start; see their run.log under the temp folder")
                time.sleep(0.1)
            for minute in range(warmup):  # unmeasured: indicators warm up, kernels compile
                before = last_id(r, topics.PREDICTIONS)
                await burst(url, symbols, minute, rng)
                wait_count(r, topics.PREDICTIONS, before, n)
            cpu0 = {k: cpu_seconds(p.pid) for k, p in procs.items()}
            stage_f, stage_p, completion = [], [], []
            marks = {t: last_id(r, t) for t in (topics.KLINES, topics.FEATURES, topics.PREDICTIONS)}
            for b in range(bursts):
                before = last_id(r, topics.PREDICTIONS)
                t_pub = await burst(url, symbols, warmup + b, rng)
                wait_count(r, topics.PREDICTIONS, before, n)
                preds = entries_after(r, topics.PREDICTIONS, before)
                completion.append(max(ms for ms, _ in preds) / 1000 - t_pub)
            cpu = {k: cpu_seconds(p.pid) - cpu0[k] for k, p in procs.items()}
            rss = {k: peak_rss_mib(p.pid) for k, p in procs.items()}
            kl = {(e["symbol"], e["open_time"]): ms for ms, e in entries_after(r, topics.KLINES, marks[topics.KLINES])}
            ft = {}
            doubled = 0
            for ms, e in entries_after(r, topics.FEATURES, marks[topics.FEATURES]):
                key = (e["symbol"], e["open_time"])
                doubled += key in ft
                ft[key] = ms
            pr = {}
            for ms, e in entries_after(r, topics.PREDICTIONS, marks[topics.PREDICTIONS]):
                key = (e["symbol"], e["open_time"], e.get("model"))
                doubled += key in pr
                pr[key] = ms
            for (s, t, _m), ms in pr.items():
                if (s, t) in ft:
                    stage_p.append(ms - ft[(s, t)])
            for key, ms in ft.items():
                if key in kl:
                    stage_f.append(ms - kl[key])
            lost = len(set(kl) - set(ft)) + len(set(kl) - {(s, t) for s, t, _ in pr})
        finally:
            for p in procs.values():
                p.send_signal(signal.SIGTERM)
            for p in procs.values():
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
            r.close()
    return {"n": n, "lost": lost, "doubled": doubled, "completion": completion, "stage_f": stage_f,
            "stage_p": stage_p, "cpu": cpu, "rss": rss, "bursts": bursts}


def _groups(r: redis.Redis, topic: str) -> list[dict]:
    try:
        return r.xinfo_groups(topics.stream_key(topic))
    except redis.ResponseError:
        return []


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--symbols", default="100,1000,4000")
    ap.add_argument("--bursts", type=int, default=3)
    ap.add_argument("--warmup-bursts", type=int, default=21)
    args = ap.parse_args()
    print(f"{'symbols':>7} {'lost':>4} {'dbl':>3} {'burst p50 s':>11} {'max s':>6} {'kl->ft p50/p99 ms':>18} "
          f"{'ft->pr p50/p99 ms':>18} {'CPU s feat/inf':>15} {'RSS MiB feat/inf':>17}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in args.symbols.split(",")):
            res = await run_size(n, args.bursts, args.warmup_bursts, Path(tmp))
            print(f"{n:>7} {res['lost']:>4} {res['doubled']:>3} {pct(res['completion'], 50):>11.3f} "
                  f"{max(res['completion']):>6.3f} "
                  f"{pct(res['stage_f'], 50):>8.0f}/{pct(res['stage_f'], 99):<9.0f} "
                  f"{pct(res['stage_p'], 50):>8.0f}/{pct(res['stage_p'], 99):<9.0f} "
                  f"{res['cpu']['features']:>7.2f}/{res['cpu']['inference']:<7.2f} "
                  f"{res['rss']['features']:>8.0f}/{res['rss']['inference']:<8.0f}", flush=True)
    print(f"({args.bursts} measured bursts per size after {args.warmup_bursts} warm-up bursts; CPU over the "
          f"measured bursts; cpus {len(os.sched_getaffinity(0))})")


if __name__ == "__main__":
    asyncio.run(main())
