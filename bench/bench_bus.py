"""Drain rate of klines.v1 through the bus edge, beside a raw redis-py loop measured in the same run.

Each case drains the same pre-filled stream (N events over S symbols, 1m candles) through a fresh
consumer group on one embedded redis-server and prints events/s, the ratio to the raw loop, and
the consumer's CPU time per event (steadier than the rate on a shared machine: the rate also
waits on redis-server, which shares the cores):

* raw:            XREADGROUP COUNT 1000 + one XACK per batch, hiredis, no decoding (the ceiling)
* raw+pydantic:   the same, validating every entry with KlineEvent.model_validate_json
* bus.ordered:    ``@bus.ordered`` with an empty per-event handler
* bus.ordered_batch: ``@bus.ordered_batch`` with an empty batch handler (skipped if absent)
* features:       the features service (skeleton-v1 and all-v1, warm-up off), publishes included
* features, P partitions: all-v1 with klines.v1 split in P partitions (``--partitions``), one process
                  owning them all (its per-partition read loops overlap their Redis round trips)

    .venv/bin/python bench/bench_bus.py [--events 100000] [--symbols 100] [--slow-events 20000]

``--slow-events`` caps the cases that are too slow to drain the full stream in reasonable time
(their rate is still events/s over what they drained).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import redis
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from libs.common import topics  # noqa: E402
from libs.common.bus import DATA_FIELD, Bus  # noqa: E402
from libs.common.contracts import KlineEvent  # noqa: E402
from libs.common.redis_server import EmbeddedRedis  # noqa: E402
from libs.common.launch import settle_heap  # noqa: E402

KEY = topics.stream_key(topics.KLINES)
MINUTE = 60_000
RAW_COUNT = 1000


def prefill(url: str, events: int, symbols: int, partitions: int = 1) -> None:
    """``events`` candles over ``symbols`` symbols, each on its key's partition of klines.v1 (as
    ingest routes them; one stream with one partition)."""
    r = redis.Redis.from_url(url)
    r.flushdb()
    names = [f"S{i:04d}USDT" for i in range(symbols)]
    keys = {n: topics.stream_key(topics.KLINES, topics.partition_of(n, "1m", partitions)) for n in names}
    pipe = r.pipeline(transaction=False)
    for i in range(events):
        t = (i // symbols) * MINUTE
        p = 100.0 + (i % 7)
        ev = KlineEvent(
            symbol=names[i % symbols], interval="1m", open_time=t, close_time=t + MINUTE - 1,
            open=p, high=p + 1, low=p - 1, close=p + 0.5, volume=10.0, ingested_at=1,
        )
        pipe.xadd(keys[ev.symbol], {DATA_FIELD: ev.to_json()})
        if len(pipe) >= 5000:
            pipe.execute()
    pipe.execute()
    r.close()


def fresh_group(url: str, group: str) -> None:
    r = redis.Redis.from_url(url)
    for g in r.xinfo_groups(KEY):
        r.xgroup_destroy(KEY, g["name"])
    r.xgroup_create(KEY, group, id="0")
    # Everything a previous case left: its outputs, and the position kept beside the stream (a
    # group recreated at 0 would otherwise take the earlier case's entries as acknowledged).
    r.delete(*r.keys("klinebus:{features.v1}*") or ["-"])
    r.delete(*r.keys("klinebus:{klines.v1}:*") or ["-"])
    r.close()


async def raw_loop(url: str, events: int, validate: bool) -> float:
    fresh_group(url, "raw")
    client = aioredis.Redis.from_url(url)
    done = 0
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    while done < events:
        reply = await client.xreadgroup("raw", "c", {KEY: ">"}, count=RAW_COUNT, block=1000)
        entries = reply[0][1] if reply else []
        if validate:
            for _, fields in entries:
                KlineEvent.model_validate_json(fields[b"__data__"])
        if entries:
            await client.xack(KEY, "raw", *[e[0] for e in entries])
        done += len(entries)
    dt = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    await client.aclose()
    return done / dt, cpu / done * 1e6


async def wait_drained(url: str, group: str, events: int, timeout: float = 600.0) -> None:
    client = aioredis.Redis.from_url(url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            groups = {g["name"].decode(): g for g in await client.xinfo_groups(KEY)}
            g = groups.get(group)
            if g is not None and g["pending"] == 0 and _id_seq(g["last-delivered-id"]) >= events:
                return
            await asyncio.sleep(0.01)
        raise TimeoutError(f"{group}: not drained after {timeout}s")
    finally:
        await client.aclose()


# The recorded entry ids as one int64 each (ms << 20 | seq): a list of 100,000s of tuples would
# be walked by every full garbage collection of the process under test and slow it down.
_ids = np.zeros(0, dtype=np.int64)


def _id_int(ms: int, seq: int) -> int:
    return (ms << 20) | seq


def _id_seq(last_delivered: bytes) -> int:
    """How many entries a last-delivered id covers (ids were recorded after prefill)."""
    ms, seq = (int(x) for x in last_delivered.split(b"-"))
    return int(np.searchsorted(_ids, _id_int(ms, seq), side="right"))


def record_ids(url: str, events: int) -> None:
    r = redis.Redis.from_url(url)
    global _ids
    ids: list[int] = []
    start = "-"
    while True:
        batch = r.xrange(KEY, min=start, count=10_000)
        ids += [_id_int(*(int(x) for x in e[0].split(b"-"))) for e in batch]
        if len(batch) < 10_000:
            break
        start = "(" + batch[-1][0].decode()
    r.close()
    _ids = np.array(ids, dtype=np.int64)


async def bus_case(url: str, events: int, batch: bool) -> float:
    fresh_group(url, "features")
    consumer = Bus("features", url, consumer="c")
    if batch:
        @consumer.ordered_batch(topics.KLINES, KlineEvent)
        async def handle_many(batch_events, entry_ids) -> None:
            return None
    else:
        @consumer.ordered(topics.KLINES, KlineEvent)
        async def handle(event, entry_id) -> None:
            return None

    cpu0 = time.process_time()
    t0 = time.perf_counter()
    await _start(consumer)
    settle_heap()
    try:
        await wait_drained(url, "features", events)
    finally:
        dt = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        await _stop(consumer)
    return events / dt, cpu / events * 1e6


async def _start(bus: Bus) -> None:
    if hasattr(bus, "start"):
        await bus.start()
    else:  # the bus before the rewrite
        await bus.ensure_groups()
        await bus.recover()
        await bus.broker.start()


async def _stop(bus: Bus) -> None:
    if hasattr(bus, "stop"):
        await bus.stop()
    else:
        await bus.broker.stop()


async def features_case(url: str, events: int, feature_set: str, tmp: Path) -> tuple[float, float]:
    from services.features.app import create
    from services.features.settings import FeaturesSettings

    fresh_group(url, "features")
    _compile(feature_set)
    settings = FeaturesSettings(
        feature_set=feature_set, warmup_source="none", data_dir=tmp, consumer_name="bench", http_host="127.0.0.1"
    )
    runtime = create(settings, url)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    await runtime.start(http=False)
    settle_heap()  # as `klinebus run` does once a service has started (libs/common/launch.py)
    try:
        await wait_drained(url, "features", events)
    finally:
        dt = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        await runtime.stop()
    r = redis.Redis.from_url(url)
    out = r.xlen(topics.stream_key(topics.FEATURES))
    r.close()
    if out != events:
        print(f"  !! features.v1 holds {out} events for {events} candles")
    return events / dt, cpu / events * 1e6


async def features_partitioned_case(url: str, events: int, symbols: int, partitions: int, feature_set: str,
                                    tmp: Path) -> tuple[float, float]:
    """One features process owning every partition of a klines.v1 split in ``partitions``: its
    read loops overlap one partition's Redis round trips with another's indicator work."""
    from services.features.app import create
    from services.features.settings import FeaturesSettings

    prefill(url, events, symbols, partitions)
    _compile(feature_set)
    settings = FeaturesSettings(
        feature_set=feature_set, warmup_source="none", data_dir=tmp, consumer_name="bench", http_host="127.0.0.1",
        partitions=partitions,
    )
    runtime = create(settings, url)
    out_keys = topics.stream_keys(topics.FEATURES, partitions)
    client = aioredis.Redis.from_url(url)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    await runtime.start(http=False)
    settle_heap()
    try:
        deadline = time.monotonic() + 600
        while sum([await client.xlen(k) for k in out_keys]) < events:
            if time.monotonic() > deadline:
                raise TimeoutError("features.v1 not complete after 600 s")
            await asyncio.sleep(0.005)
    finally:
        dt = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        await runtime.stop()
        await client.aclose()
    return events / dt, cpu / events * 1e6


def _compile(feature_set: str) -> None:
    """Compile (or load) the numba kernels before the clock starts: a one-time cost per process."""
    import numpy as np

    from libs.indicators.streaming import StreamingEngine

    engine = StreamingEngine(feature_set)
    n = 600
    keys = [(f"K{i % 300}", "1m") for i in range(n)]
    ot = np.array([(i // 300) * MINUTE for i in range(n)], dtype=np.int64)
    p = np.full(n, 100.0)
    engine.update_many(keys, ot, p, p + 1, p - 1, p, p)


def drained_prefix(url: str, events: int, symbols: int, n: int) -> None:
    """Re-fill with only the first ``n`` events (for the slow cases)."""
    prefill(url, n, symbols)
    record_ids(url, n)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--symbols", type=int, default=100)
    ap.add_argument("--slow-events", type=int, default=0, help="cap for the bus/features cases (0: --events)")
    ap.add_argument("--partitions", default="4", help="comma-separated partition counts for the features all-v1 "
                    "case with klines.v1 split, one process owning every partition ('' to skip)")
    ap.add_argument("--only-features", action="store_true", help="only the features cases")
    args = ap.parse_args()
    slow = args.slow_events or args.events
    import logging

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp) / "redis", persistent=False) as server:
        url = server.url
        print(f"prefilling {args.events} klines.v1 events over {args.symbols} symbols ...")
        prefill(url, args.events, args.symbols)
        record_ids(url, args.events)
        rows: list[tuple[str, float, str]] = []
        raw, cpu_us = await raw_loop(url, args.events, validate=False)
        rows.append(("raw redis-py (XREADGROUP 1000 + XACK/batch)", raw, f"{cpu_us:.1f} us CPU/event"))
        if not args.only_features:
            rate, cpu_us = await raw_loop(url, args.events, validate=True)
            rows.append(("raw + pydantic validate each", rate, f"{cpu_us:.1f} us CPU/event"))
        if slow != args.events:
            drained_prefix(url, args.events, args.symbols, slow)
        if not args.only_features:
            rate, cpu_us = await bus_case(url, slow, batch=False)
            rows.append(("bus.ordered, empty handler", rate, f"{cpu_us:.1f} us CPU/event"))
            if hasattr(Bus, "ordered_batch"):
                rate, cpu_us = await bus_case(url, slow, batch=True)
                rows.append(("bus.ordered_batch, empty handler", rate, f"{cpu_us:.1f} us CPU/event"))
        for fs in ("skeleton-v1", "all-v1"):
            rate, cpu_us = await features_case(url, slow, fs, Path(tmp))
            rows.append((f"features service ({fs}), publishes incl.", rate, f"{cpu_us:.1f} us CPU/event"))
        for p in [int(x) for x in args.partitions.split(",") if x]:  # last: they re-fill the streams
            rate, cpu_us = await features_partitioned_case(url, slow, args.symbols, p, "all-v1", Path(tmp))
            rows.append((f"features (all-v1), {p} partitions, one process", rate, f"{cpu_us:.1f} us CPU/event"))
        print(f"\n{'case':<48} {'events/s':>10} {'x raw':>7}")
        for name, rate, note in rows:
            print(f"{name:<48} {rate:>10,.0f} {rate / raw:>7.3f}  {note}")
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"\npeak RSS {rss:.0f} MiB; cpus {len(os.sched_getaffinity(0))}; events {args.events} (bus/features: {slow})")


if __name__ == "__main__":
    asyncio.run(main())
