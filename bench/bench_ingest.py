"""Ingest throughput (simulator -> klines.v1, candles/s) and close-to-publish latency,
beside a raw redis-py XADD pipeline of the same payloads measured in the same run.

Two paths: *live* (the simulator replays as fast as it can; candles arrive over the
websocket) and *backfill* (every candle has already closed; ingest starts with state saying
it last published the candle before the first one, so all of them come over REST in pages
of 1000).

*Burst* (``--burst 100,500,1000``): N streams close at the same moment (the shipped candles
under made-up symbols); for the last close of the replay it prints the burst completion time
(the exchange's send of the closes -> the last of them on klines.v1), candles lost and doubled,
and how many publish calls carried the burst, beside a raw pipelined XADD of the same N
payloads in the same run. Initial REST history is off there (it would measure REST, not the
publish path).

    .venv/bin/python bench/bench_ingest.py [--candles 2000] [--symbols 3] [--burst 100,500]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import orjson
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from libs.common import topics  # noqa: E402
from libs.common.bus import DATA_FIELD, LAST_OPEN_TIME, candle_field  # noqa: E402
from libs.common.contracts import KlineEvent  # noqa: E402
from libs.common.klines import interval_ms  # noqa: E402
from libs.common.redis_server import EmbeddedRedis  # noqa: E402
from services.ingest.settings import IngestSettings  # noqa: E402
from services.ingest.app import create  # noqa: E402
from services.ingest.simulator import ExchangeSimulator, load_candles  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "data" / "klines"


def bench_settings(sim: ExchangeSimulator, candles, tmp: Path) -> IngestSettings:
    return IngestSettings(
        binance_ws_url=sim.ws_url, binance_rest_url=sim.rest_url, symbols=sorted({s for s, _ in candles}),
        intervals=["1m"], data_dir=tmp, consumer_name="bench", http_host="127.0.0.1",
    )


async def seconds_until_published(r: redis.Redis, key: str, total: int, runtime, t0: float) -> float:
    """Seconds from ``t0`` until ``key`` holds ``total`` entries; stops ``runtime`` either way."""
    try:
        while r.xlen(key) < total:
            await asyncio.sleep(0.01)
        return time.perf_counter() - t0
    finally:
        await runtime.stop()


async def ingest_run(url: str, candles, speed: float, tmp: Path) -> tuple[float, list[float]]:
    total = sum(len(v) for v in candles.values())
    key = topics.stream_key(topics.KLINES)
    r = redis.Redis.from_url(url)
    sim = ExchangeSimulator(candles, speed=speed, updates_per_candle=0)
    await sim.start(replay=False)
    try:
        runtime = create(bench_settings(sim, candles, tmp), url)
        await runtime.start(http=False)
        while sim.connections < 1:
            await asyncio.sleep(0.01)
        sim.begin()
        elapsed = await seconds_until_published(r, key, total, runtime, time.perf_counter())
        lat = []
        for _, fields in r.xrange(key):
            e = orjson.loads(fields[DATA_FIELD.encode()])
            sent = sim.started_wall + (e["close_time"] + 1 - sim.start_ms) / (speed * 1000)
            lat.append(e["ingested_at"] / 1000 - sent)
    finally:
        await sim.stop()
    r.close()
    return total / elapsed, lat


async def backfill_run(url: str, candles, tmp: Path) -> float:
    total = sum(len(v) for v in candles.values())
    key = topics.stream_key(topics.KLINES)
    r = redis.Redis.from_url(url)
    r.delete(key, topics.stream_companion_key(topics.KLINES, LAST_OPEN_TIME))
    # Every candle closes on the simulated clock before ingest starts: all of them are history.
    sim = ExchangeSimulator(candles, speed=10_000_000.0, updates_per_candle=0)
    await sim.start()
    try:
        await sim.wait_done()
        for (symbol, interval), ks in candles.items():
            before_first = ks[0].open_time - interval_ms(interval)
            r.hset(topics.stream_companion_key(topics.KLINES, LAST_OPEN_TIME), candle_field(symbol, interval), before_first)
        runtime = create(bench_settings(sim, candles, tmp), url)
        t0 = time.perf_counter()
        await runtime.start(http=False)
        elapsed = await seconds_until_published(r, key, total, runtime, t0)
    finally:
        await sim.stop()
    r.close()
    return total / elapsed


async def burst_run(url: str, n: int, tmp: Path, speed: float = 20.0) -> dict:
    """``n`` streams of 3 candles closing together; figures for the last close."""
    from dataclasses import replace

    base = list(load_candles(sorted(DATA.glob("*-1m-*.csv.gz")), limit=3).values())
    candles = {}
    for i in range(n):
        src = base[i % len(base)]
        symbol = f"B{i:04d}{src[0].symbol}"
        candles[(symbol, "1m")] = [replace(k, symbol=symbol) for k in src]
    key = topics.stream_key(topics.KLINES)
    r = redis.Redis.from_url(url)
    r.delete(key, topics.stream_companion_key(topics.KLINES, LAST_OPEN_TIME))
    sim = ExchangeSimulator(candles, speed=speed, updates_per_candle=1)
    await sim.start(replay=False)
    try:
        settings = bench_settings(sim, candles, tmp).model_copy(update={"initial_backfill_candles": 0})
        runtime = create(settings, url)
        await runtime.start(http=False)
        while sim.connections < len(runtime.ws_client.chunks):
            await asyncio.sleep(0.01)
        sim.begin()
        last_close = max(ks[-1].close_time for ks in candles.values())
        while r.xlen(key) < 2 * n:
            await asyncio.sleep(0.01)
        calls_before = runtime.engine.sink.calls
        elapsed = await seconds_until_published(r, key, 3 * n, runtime, time.perf_counter())
        events = [orjson.loads(f[DATA_FIELD.encode()]) for _, f in r.xrange(key)]
        calls = runtime.engine.sink.calls - calls_before
    finally:
        await sim.stop()
    r.close()
    sent = sim.started_wall + (last_close + 1 - sim.start_ms) / (speed * 1000)
    last = [e for e in events if e["close_time"] == last_close]
    keys = [(e["symbol"], e["open_time"]) for e in events]
    return {
        "streams": n,
        "burst_s": max(e["ingested_at"] for e in last) / 1000 - sent,
        "lost": 3 * n - len(set(keys)),
        "doubled": len(keys) - len(set(keys)),
        "calls": calls,
        "waited_s": elapsed,
    }


def xadd_burst(url: str, n: int) -> float:
    """Seconds for one pipelined call of ``n`` XADDs (the floor a burst of n closes could reach)."""
    (ks,) = load_candles(sorted(DATA.glob("BTCUSDT-1m-*.csv.gz")), limit=1).values()
    payloads = [KlineEvent.from_kline(ks[0], "ws").to_json()] * n
    r = redis.Redis.from_url(url)
    key = topics.stream_key(topics.KLINES) + ":bench-burst"
    t0 = time.perf_counter()
    pipe = r.pipeline(transaction=False)
    for p in payloads:
        pipe.xadd(key, {DATA_FIELD: p}, maxlen=1_000_000, approximate=True)
    pipe.execute()
    elapsed = time.perf_counter() - t0
    r.delete(key)
    r.close()
    return elapsed


def xadd_run(url: str, candles) -> float:
    payloads = [KlineEvent.from_kline(k, "ws").to_json() for ks in candles.values() for k in ks]
    r = redis.Redis.from_url(url)
    key = topics.stream_key(topics.KLINES) + ":bench-raw"
    t0 = time.perf_counter()
    pipe = r.pipeline(transaction=False)
    for i, p in enumerate(payloads, 1):
        pipe.xadd(key, {DATA_FIELD: p}, maxlen=1_000_000, approximate=True)
        if i % 500 == 0:
            pipe.execute()
    pipe.execute()
    elapsed = time.perf_counter() - t0
    r.delete(key)
    r.close()
    return len(payloads) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candles", type=int, default=2000, help="candles per symbol")
    ap.add_argument("--symbols", type=int, default=3)
    ap.add_argument("--speed", type=float, default=60_000.0, help="simulated s per real s (high = as fast as possible)")
    ap.add_argument("--burst", default="", help="comma-separated stream counts closing together, e.g. 100,500,1000")
    args = ap.parse_args()
    if args.burst:
        with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp) / "redis", persistent=False) as server:
            for n in (int(x) for x in args.burst.split(",")):
                b = asyncio.run(burst_run(server.url, n, Path(tmp)))
                raw = xadd_burst(server.url, n)
                print(f"burst of {n:5d} closes: last on klines.v1 {b['burst_s'] * 1000:7.1f} ms after the exchange sent them"
                      f" (raw XADD pipeline of {n}: {raw * 1000:6.1f} ms, ratio {b['burst_s'] / raw:5.1f}x);"
                      f" {b['calls']} publish calls; lost {b['lost']}, doubled {b['doubled']}")
        return
    paths = sorted(DATA.glob("*-1m-*.csv.gz"))[: args.symbols]
    candles = load_candles(paths, limit=args.candles)
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp) / "redis", persistent=False) as server:
        rate, lat = asyncio.run(ingest_run(server.url, candles, args.speed, Path(tmp)))
        backfill = asyncio.run(backfill_run(server.url, candles, Path(tmp)))
        raw = xadd_run(server.url, candles)
    lat_ms = sorted(x * 1000 for x in lat)
    p = lambda q: lat_ms[min(len(lat_ms) - 1, int(q * len(lat_ms)))]  # noqa: E731
    print(f"candles: {len(lat_ms)} ({args.symbols} symbols x {args.candles}), simulator speed x{args.speed:g}")
    print(f"live     websocket -> klines.v1 : {rate:10.0f} candles/s   ratio to raw XADD {rate / raw:6.3f}")
    print(f"backfill REST -> klines.v1      : {backfill:10.0f} candles/s   ratio to raw XADD {backfill / raw:6.3f}")
    print(f"raw      redis-py XADD pipeline : {raw:10.0f} entries/s")
    print(f"close-to-publish latency ms    : p50 {p(0.5):.2f}  p95 {p(0.95):.2f}  p99 {p(0.99):.2f}  mean {statistics.fmean(lat_ms):.2f}")
    print("(at this speed the exchange sends faster than real time, so latency includes queueing behind the burst;"
          " run with --speed 600 for latency at a realistic message rate)")


if __name__ == "__main__":
    main()
