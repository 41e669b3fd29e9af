"""Faults on real processes: ``klinebus run features`` and ``klinebus run inference`` as
subprocesses on a real, persistent (AOF) redis-server, fed a steady replay of real candles on
klines.v1 by an ingest-like producer (the once-per-candle guard, retrying what Redis refuses).

Faults: SIGKILL of features and of inference mid-stream (then restarted), Redis refusing writes
(``maxmemory`` 1 with ``noeviction``) for seconds, the features group deleted under the running
consumer, Redis killed and restarted from its AOF, a second features replica beside the first
(then the first killed: the standby takes over).

After the faults, once both consumers have drained and acknowledged everything: every output
stream holds exactly one event per closed candle, in order; features values equal the batch
computation over the same candles; nothing is pending. The fast variant runs a few faults once;
the slow one 30 (five of each kind) at random points (``KLINEBUS_FAULT_SEED``), and prints its
figures.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aioredis

from libs.common import topics
from libs.common.bus import OncePerCandle
from libs.common.contracts import KlineEvent
from libs.common.klines import read_kline_csv
from libs.common.redis_server import EmbeddedRedis
from libs.indicators.batch import compute_batch
from libs.indicators.feature_sets import get_feature_set
from tests.streams import read_topic

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "data" / "klines"
FEATURE_SET = "skeleton-v1"
DRAIN_TIMEOUT_S = 120.0
SLOW_FAULTS = 30  # a multiple of the six kinds
pytestmark = pytest.mark.timeout(600)


def shipped(symbols: tuple[str, ...], n: int) -> dict[str, list]:
    out = {}
    for symbol in symbols:
        (path,) = SHIPPED.glob(f"{symbol}-1m-*.csv.gz")
        out[symbol] = read_kline_csv(path)[:n]
    return out


class Service:
    """One ``klinebus run <service>`` process."""

    def __init__(self, service: str, url: str, folder: Path, consumer: str, **env: str) -> None:
        self.service, self.url, self.consumer = service, url, consumer
        self.folder = folder / f"{service}-{consumer}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "KLINEBUS_REDIS_URL": url,
            "KLINEBUS_DATA_DIR": str(self.folder),
            "KLINEBUS_CONSUMER_NAME": consumer,
            "KLINEBUS_HTTP_PORT": "0",
            "KLINEBUS_HTTP_HOST": "127.0.0.1",
            "KLINEBUS_OWNER_LEASE_MS": "2000",
            "KLINEBUS_LOG_FORMAT": "text",
            **env,
        }
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        log = open(self.folder / f"run-{self.starts}.log", "wb")  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "klinebus", "run", self.service], cwd=REPO, env=self.env,
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        self.starts += 1

    def kill(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, f"{self.service} died on its own: {self.tail()}"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self) -> str:
        logs = sorted(self.folder.glob("run-*.log"))
        return logs[-1].read_text(errors="replace")[-3000:] if logs else ""


class Producer:
    """An ingest stand-in: publishes the candles in time order, a few per step, through the
    once-per-candle guard; what Redis refuses is retried until it is taken."""

    def __init__(self, url: str, candles: dict[str, list], per_step: int, step_s: float) -> None:
        self.url = url
        rows = [k for ks in candles.values() for k in ks]
        rows.sort(key=lambda k: (k.open_time, k.symbol))
        self.rows = rows
        self.per_step, self.step_s = per_step, step_s
        self.published = 0

    async def run(self) -> None:
        client = aioredis.Redis.from_url(self.url, socket_timeout=5)
        guard = OncePerCandle(client, topics.KLINES, 200_000)
        try:
            while self.published < len(self.rows):
                batch = [KlineEvent.from_kline(k, "ws") for k in self.rows[self.published : self.published + self.per_step]]
                try:
                    await guard.publish_many(batch)
                except Exception:  # noqa: BLE001 - Redis down or refusing: try the same candles again
                    await asyncio.sleep(0.1)
                    continue
                self.published += len(batch)
                await asyncio.sleep(self.step_s)
        finally:
            await client.aclose()


async def wait_until(predicate, timeout: float, what: str, services=()) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if await predicate():
                return
        except Exception:  # noqa: BLE001 - Redis may be restarting
            pass
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {s.service} {s.consumer}\n{s.tail()}" for s in services)
            raise AssertionError(f"{what}: not within {timeout:.0f}s\n{tails}")
        await asyncio.sleep(0.1)


async def drained(client, topic: str, group: str) -> bool:
    key = topics.stream_key(topic)
    last = await client.xrevrange(key, count=1)
    if not last:
        return False
    for g in await client.xinfo_groups(key):
        if g["name"].decode() == group:
            return g["pending"] == 0 and g["last-delivered-id"] == last[0][0]
    return False


async def group_started(client, topic: str, group: str) -> bool:
    key = topics.stream_key(topic)
    return await client.exists(key) and any(g["name"].decode() == group for g in await client.xinfo_groups(key))


def verify(url: str, candles: dict[str, list], features: list[dict], predictions: list[dict]) -> dict[str, int]:
    """Exactly one event per candle per stream, in order, features equal to batch."""
    figures = {"events checked": 0, "lost": 0, "doubled": 0}
    names = list(get_feature_set(FEATURE_SET).features)
    for symbol, ks in candles.items():
        expected = [k.open_time for k in ks]
        got_f = [e for e in features if e["symbol"] == symbol]
        times = [e["open_time"] for e in got_f]
        figures["lost"] += len(set(expected) - set(times))
        figures["doubled"] += len(times) - len(set(times))
        assert times == expected, f"features.v1 {symbol}: {len(times)} events for {len(expected)} candles"
        cols = [np.array([getattr(k, f) for k in ks]) for f in ("open", "high", "low", "close", "volume")]
        ref = compute_batch(*cols, names=names)
        for i, e in enumerate(got_f):
            if e["warm"]:
                for name in names:
                    assert e["values"][name] == pytest.approx(ref[name][i], rel=1e-9, abs=1e-9), (symbol, i, name)
        by_model: dict[str, list[int]] = {}
        for p in predictions:
            if p["symbol"] == symbol:
                by_model.setdefault(p["model"], []).append(p["open_time"])
        assert by_model, f"no predictions for {symbol}"
        for model, ts in by_model.items():
            figures["doubled"] += len(ts) - len(set(ts))
            assert ts == sorted(set(ts)), f"predictions.v1 {symbol} {model}: out of order or doubled"
            figures["lost"] += len(set(expected) - set(ts))
            assert ts == expected, f"predictions.v1 {symbol} {model}: {len(ts)} for {len(expected)} candles"
        figures["events checked"] += len(times) + sum(len(ts) for ts in by_model.values())
    return figures


class Faults:
    """The injected faults, counted."""

    def __init__(self, redis: EmbeddedRedis, folder: Path) -> None:
        self.redis = redis
        self.folder = folder
        self.kills = 0
        self.injected = 0

    async def client(self):
        return aioredis.Redis.from_url(self.redis.url, socket_timeout=5)

    async def sigkill_and_restart(self, svc: Service) -> None:
        svc.kill()
        self.kills += 1
        self.injected += 1
        svc.start()

    async def refuse_writes(self, seconds: float) -> None:
        c = await self.client()
        try:
            await c.config_set("maxmemory-policy", "noeviction")
            await c.config_set("maxmemory", 1)
            self.injected += 1
            await asyncio.sleep(seconds)  # the fault's duration, not a wait for an effect
        finally:
            await c.config_set("maxmemory", 0)
            await c.aclose()

    async def delete_group(self, topic: str, group: str) -> None:
        c = await self.client()
        try:
            await c.xgroup_destroy(topics.stream_key(topic), group)
            self.injected += 1
        finally:
            await c.aclose()

    async def restart_redis(self) -> None:
        """SIGKILL the server (no SHUTDOWN, no final save) and start it again on its AOF."""
        proc = self.redis.process
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        self.redis.process = None
        if self.redis._lock is not None:
            self.redis._lock.close()
            self.redis._lock = None
        self.redis.start()
        self.injected += 1


async def run_scenario(tmp_path: Path, symbols: tuple[str, ...], n: int, plan) -> dict[str, int]:
    candles = shipped(symbols, n)
    with EmbeddedRedis(tmp_path / "redis", persistent=True) as server:
        url = server.url
        env = {"KLINEBUS_FEATURE_SET": FEATURE_SET, "KLINEBUS_WARMUP_SOURCE": "none", "KLINEBUS_CHECKPOINT_EVERY_S": "0.5"}
        features = Service("features", url, tmp_path, "features-1", **env)
        inference = Service("inference", url, tmp_path, "inference-1")
        services = [features, inference]
        faults = Faults(server, tmp_path)
        try:
            features.start()
            inference.start()
            c = await faults.client()
            await wait_until(lambda: group_started(c, topics.KLINES, "features"), 90, "features started", services)
            await wait_until(lambda: group_started(c, topics.FEATURES, "inference"), 90, "inference started", services)
            await c.aclose()
            producer = Producer(url, candles, per_step=len(symbols), step_s=0.02)
            feeding = asyncio.create_task(producer.run())
            await plan(faults, features, inference, services, producer, tmp_path, env)
            await feeding
            c = await faults.client()

            async def all_drained() -> bool:
                return (await drained(c, topics.KLINES, "features")
                        and await drained(c, topics.FEATURES, "inference")
                        and await c.xlen(topics.stream_key(topics.FEATURES)) >= len(producer.rows))

            await wait_until(all_drained, DRAIN_TIMEOUT_S, "drained and acknowledged", services)
            await c.aclose()
            feats = await read_topic(url, topics.FEATURES)
            preds = await read_topic(url, topics.PREDICTIONS)
        finally:
            for svc in services:
                svc.stop()
        figures = verify(url, candles, feats, preds)
    figures["kills survived"] = faults.kills
    figures["faults injected"] = faults.injected
    return figures


async def fast_plan(faults: Faults, features: Service, inference: Service, services, producer, tmp, env) -> None:
    async def at(published: int) -> None:
        await wait_until(lambda: _now(producer.published >= published), 60, f"{published} candles published", services)

    total = len(producer.rows)
    await at(total // 5)
    await faults.sigkill_and_restart(features)
    await at(total * 2 // 5)
    await faults.refuse_writes(2.0)
    await at(total * 3 // 5)
    await faults.delete_group(topics.KLINES, "features")
    await at(total * 4 // 5)
    await faults.sigkill_and_restart(inference)


async def test_faults_on_real_processes_lose_and_double_nothing(tmp_path):
    figures = await run_scenario(tmp_path, ("BTCUSDT", "ETHUSDT"), 150, fast_plan)
    print("fault test (fast):", ", ".join(f"{k} {v}" for k, v in figures.items()))
    assert figures["lost"] == 0 and figures["doubled"] == 0


async def slow_plan(faults: Faults, features: Service, inference: Service, services, producer, tmp, env) -> None:
    rng = random.Random(int(os.environ.get("KLINEBUS_FAULT_SEED", "7")))
    total = len(producer.rows)
    points = sorted(rng.sample(range(total // 20, total * 9 // 10), SLOW_FAULTS))
    kinds = ["kill_features", "kill_inference", "oom", "group", "redis", "replica"] * (SLOW_FAULTS // 6)
    rng.shuffle(kinds)
    second: Service | None = None
    replicas = 1
    for point, kind in zip(points, kinds):
        await wait_until(lambda: _now(producer.published >= point), 120, f"{point} published", services)
        if kind == "kill_features":
            await faults.sigkill_and_restart(features)
        elif kind == "kill_inference":
            await faults.sigkill_and_restart(inference)
        elif kind == "oom":
            await faults.refuse_writes(rng.uniform(1.0, 4.0))
        elif kind == "group":
            await faults.delete_group(topics.KLINES, "features")
        elif kind == "redis":
            await faults.restart_redis()
        elif kind == "replica":
            if second is None:  # a second replica beside the first: a hot standby
                replicas += 1
                second = Service("features", faults.redis.url, tmp, f"features-{replicas}", **env)
                services.append(second)
                second.start()
                faults.injected += 1
            else:  # the owner dies; the standby takes over
                features.kill()
                faults.kills += 1
                faults.injected += 1
                features, second = second, None


@pytest.mark.slow
async def test_many_faults_at_random_points_lose_and_double_nothing(tmp_path):
    figures = await run_scenario(tmp_path, ("BTCUSDT", "ETHUSDT", "SOLUSDT"), 1500, slow_plan)
    print("fault test (slow):", ", ".join(f"{k} {v}" for k, v in figures.items()))
    assert figures["lost"] == 0 and figures["doubled"] == 0


async def _now(value):
    return value
