"""The fault harness: klinebus services as real processes (``klinebus run <service>``) on a real,
persistent (AOF) redis-server, fed real candles, with faults injected and counted, and the
outputs checked against the candles afterwards.

Feeds: ``Producer`` publishes klines.v1 directly through the once-per-candle guard (an ingest
stand-in); ``SimFeed`` runs the exchange simulator in this process, replaying the candles over a
real websocket and REST to ``klinebus run ingest``.

Faults (``Faults``): SIGKILL + restart of any service, Redis refusing writes (``maxmemory`` 1,
``noeviction``), Redis read-only (``REPLICAOF`` a master that never answers, then ``REPLICAOF NO
ONE``), a consumer group deleted under its consumer, Redis SIGKILLed and restarted from its AOF,
a second features replica (a hot standby), the ordered owner paused (SIGSTOP) past its lease
while the standby takes over, a competing archiver paused past the reclaim time.

``verify``: once every consumer has drained and acknowledged everything, klines.v1 holds exactly
one event per closed candle, in order, with the candle's values; features.v1 the same, with
values equal to the batch computation; predictions.v1 one per candle per model, in order; the
archive (its read path) every candle once with the candle's values.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Awaitable, Callable

import numpy as np
import pytest
import redis.asyncio as aioredis
import redis.exceptions as rex

from libs.common import topics
from libs.common.archive import ParquetArchive
from libs.common.bus import OncePerCandle
from libs.common.bus.groups import position_key, service_lease_key
from libs.common.contracts import KlineEvent
from libs.common.klines import Kline, read_kline_csv
from libs.common.redis_server import EmbeddedRedis
from libs.indicators.batch import compute_batch
from libs.indicators.feature_sets import get_feature_set
from tests.streams import read_topic

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "data" / "klines"
FEATURE_SET = "skeleton-v1"
INTERVAL = "1m"
START_TIMEOUT_S = 120.0  # a service's start (imports, numba cache) on a loaded 2-core machine
EFFECT_TIMEOUT_S = 90.0  # a fault's effect (a takeover, a reclaim) under the same load
DRAIN_TIMEOUT_S = 180.0
LEASE_MS = 2000  # ordered groups' ownership lease: a paused owner loses it after this long
RECLAIM_IDLE_MS = 2000  # archivers reclaim entries pending this long on a silent replica
KLINE_FIELDS = ("open", "high", "low", "close", "volume")
TASKDUMP = Path(__file__).resolve().parent / "taskdump"


def shipped(symbols: tuple[str, ...], n: int) -> dict[str, list[Kline]]:
    """The first ``n`` real 1m candles of each symbol, from data/klines."""
    out = {}
    for symbol in symbols:
        (path,) = SHIPPED.glob(f"{symbol}-{INTERVAL}-*.csv.gz")
        out[symbol] = read_kline_csv(path)[:n]
    return out


def also_as(candles: dict[str, list[Kline]], names: dict[str, str]) -> dict[str, list[Kline]]:
    """``candles`` plus the same real candles under other symbol names (``{new: shipped}``): more
    keys than the three shipped 1m symbols, so that every partition has some."""
    out = dict(candles)
    for new, old in names.items():
        out[new] = [dataclasses.replace(k, symbol=new) for k in candles[old]]
    return out


class Service:
    """One ``klinebus run <service>`` process, restartable, with a log per start."""

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
            "KLINEBUS_OWNER_LEASE_MS": str(LEASE_MS),
            "KLINEBUS_LOG_FORMAT": "text",
            # SIGUSR1 dumps every asyncio task's stack into the log (taskdump/sitecustomize.py)
            "PYTHONPATH": os.pathsep.join(p for p in (str(TASKDUMP), os.environ.get("PYTHONPATH", "")) if p),
            **env,
        }
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.paused = False

    def __repr__(self) -> str:
        return f"{self.service}/{self.consumer}"

    def start(self) -> None:
        log = open(self.folder / f"run-{self.starts}.log", "wb")  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "klinebus", "run", self.service], cwd=REPO, env=self.env,
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        self.starts += 1
        self.paused = False

    def kill(self) -> None:
        assert self.alive(), f"{self} died on its own: {self.tail()}"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.paused = False

    def pause(self) -> None:
        assert self.alive(), f"{self} died on its own: {self.tail()}"
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if self.paused:
                self.resume()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        """The current run's log."""
        path = self.folder / f"run-{self.starts - 1}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def tail(self) -> str:
        return self.log()[-3000:]

    async def task_stacks(self, timeout: float = 5.0) -> str:
        """Where each of its asyncio tasks waits now (SIGUSR1, see taskdump/), for a failure
        message; '' when the process is gone or does not answer in time."""
        if not self.alive() or self.paused:
            return ""
        before = len(self.log())
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log()[before:]
            if "--- end of tasks" in text:
                return text
            await asyncio.sleep(0.1)
        return ""

    def says_it_owns(self, topic: str) -> bool:
        """This run of the process took ownership of ``topic`` and has not lost it since (its own
        log: the lease names only the consumer, which a restarted process shares with the dead
        one whose lease has not expired yet)."""
        text = self.log()
        return text.rfind(f" owns {topic} now") > text.rfind("lost ownership")


class Producer:
    """An ingest stand-in: publishes the candles in time order, a few per step, through the
    once-per-candle guard; what Redis refuses is retried until it is taken."""

    def __init__(self, url: str, candles: dict[str, list[Kline]], per_step: int, step_s: float,
                 partitions: int = 1) -> None:
        self.url = url
        self.partitions = partitions
        rows = [k for ks in candles.values() for k in ks]
        rows.sort(key=lambda k: (k.open_time, k.symbol))
        self.rows = rows
        self.per_step, self.step_s = per_step, step_s
        self.published = 0

    def progress(self) -> float:
        return self.published / len(self.rows)

    async def run(self) -> None:
        client = aioredis.Redis.from_url(self.url, socket_timeout=5)
        guard = OncePerCandle(client, topics.KLINES, 200_000, partitions=self.partitions)
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


class SimFeed:
    """The exchange simulator, in this process, replaying the candles at ``speed`` simulated
    seconds per real second to ``klinebus run ingest`` (websocket + REST on loopback)."""

    def __init__(self, candles: dict[str, list[Kline]], speed: float) -> None:
        from services.ingest.simulator import ExchangeSimulator

        self.sim = ExchangeSimulator({(s, INTERVAL): ks for s, ks in candles.items()}, speed=speed, updates_per_candle=1)
        self.symbols = list(candles)

    def ingest_env(self) -> dict[str, str]:
        return {
            "KLINEBUS_BINANCE_WS_URL": self.sim.ws_url,
            "KLINEBUS_BINANCE_REST_URL": self.sim.rest_url,
            "KLINEBUS_SYMBOLS": ",".join(self.symbols),
            "KLINEBUS_INTERVALS": INTERVAL,
            "KLINEBUS_RECONNECT_INITIAL_S": "0.1",
            "KLINEBUS_RECONNECT_MAX_S": "1",
        }

    def progress(self) -> float:
        if not self.sim.started_wall:
            return 0.0
        return min(1.0, (self.sim.now_ms() - self.sim.start_ms) / (self.sim.end_ms - self.sim.start_ms))

    async def run(self) -> None:
        await self.sim.begin_when_connected(1, timeout=START_TIMEOUT_S)
        await self.sim.wait_done()


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout: float, what: str, services=()) -> None:
    """Poll ``predicate`` until it holds; fail with every service's log tail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if await predicate():
                return
        except Exception:  # noqa: BLE001 - Redis may be restarting or read-only
            pass
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {s}\n{s.tail()}" for s in services)
            raise AssertionError(f"{what}: not within {timeout:.0f}s\n{tails}")
        await asyncio.sleep(0.1)


async def now(value) -> bool:
    return bool(value)


async def drained(client, topic: str, group: str, partitions: int = 1) -> bool:
    """``group`` was handed each partition's last entry and acknowledged everything (a partition
    that is still empty has nothing to hand out)."""
    for key in topics.stream_keys(topic, partitions):
        last = await client.xrevrange(key, count=1)
        if not last:
            if partitions == 1:
                return False
            continue
        groups = {g["name"].decode(): g for g in await client.xinfo_groups(key)}
        g = groups.get(group)
        if g is None or g["pending"] != 0 or g["last-delivered-id"] != last[0][0]:
            return False
    return True


async def group_started(client, topic: str, group: str) -> bool:
    key = topics.stream_key(topic)
    return await client.exists(key) and any(g["name"].decode() == group for g in await client.xinfo_groups(key))


async def partition_holders(client, group: str, partitions: int) -> dict[int, str | None]:
    """Who holds each partition's lease of ``group`` now (None: free)."""
    out: dict[int, str | None] = {}
    for p in range(partitions):
        raw = await client.get(service_lease_key(group, p))
        out[p] = raw.decode().rsplit(":", 1)[0] if raw is not None else None
    return out


async def pending_of(client, topic: str, group: str, consumer: str) -> int:
    for c in await client.xinfo_consumers(topics.stream_key(topic), group):
        if c["name"].decode() == consumer:
            return int(c["pending"])
    return 0


async def lease_holder(client, group: str) -> str | None:
    raw = await client.get(service_lease_key(group))
    return raw.decode().rsplit(":", 1)[0] if raw is not None else None


def _id(entry_id: bytes | str | None) -> tuple[int, int]:
    if entry_id is None:
        return (0, 0)
    s = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = s.partition("-")
    return int(ms), int(seq or 0)


class Pipeline:
    """The processes of one scenario: ingest (with a SimFeed), features replicas, inference,
    archivers, on one redis-server."""

    def __init__(self, server: EmbeddedRedis, folder: Path, *, ingest: SimFeed | None, features: int = 1,
                 inference: bool | int = True, archivers: int = 0, reclaim_idle_ms: int = RECLAIM_IDLE_MS,
                 partitions: int = 1) -> None:
        self.server, self.folder = server, folder
        self.partitions = partitions
        url = server.url
        # Every process of a deployment runs with the same partition count (a different one is
        # refused at start); 1 is the default, so it is only set when not.
        self.common_env = {"KLINEBUS_PARTITIONS": str(partitions)} if partitions != 1 else {}
        self.features_env = {"KLINEBUS_FEATURE_SET": FEATURE_SET, "KLINEBUS_WARMUP_SOURCE": "none",
                             "KLINEBUS_CHECKPOINT_EVERY_S": "0.5", **self.common_env}
        self.features = [Service("features", url, folder, f"features-{i + 1}", **self.features_env)
                         for i in range(features)]
        self.inferences = [Service("inference", url, folder, f"inference-{i + 1}", **self.common_env)
                           for i in range(int(inference))]
        self.archive_root = folder / "archive"
        self.archivers = [
            Service("archive", url, folder, f"archive-{i + 1}", KLINEBUS_ARCHIVE_URL=str(self.archive_root),
                    KLINEBUS_RECLAIM_IDLE_MS=str(reclaim_idle_ms), **self.common_env)
            for i in range(archivers)
        ]
        self.ingest = (Service("ingest", url, folder, "ingest-1", **ingest.ingest_env(), **self.common_env)
                       if ingest else None)
        self.replicas = features
        self.started: dict[str, int] = {"features": features, "inference": int(inference)}

    @property
    def inference(self) -> Service | None:
        """The first inference replica (the only one unless a scenario adds more)."""
        return self.inferences[0] if self.inferences else None

    def replicas_of(self, service: str) -> list[Service]:
        return self.features if service == "features" else self.inferences

    def groups(self) -> list[tuple[str, str]]:
        """(topic, group) of every consumer group in the pipeline."""
        out = [(topics.KLINES, "features")] if self.features else []
        out += [(topics.FEATURES, "inference")] if self.inference else []
        out += [(topics.KLINES, "archive")] if self.archivers else []
        return out

    @property
    def services(self) -> list[Service]:
        return [*self.features, *self.inferences, *self.archivers,
                *([self.ingest] if self.ingest else [])]

    async def client(self):
        return aioredis.Redis.from_url(self.server.url, socket_timeout=5)

    async def start(self) -> None:
        for svc in self.services:
            svc.start()
        c = await self.client()
        try:
            for topic, group in self.groups():
                await wait_until(lambda: group_started(c, topic, group), START_TIMEOUT_S, f"{group} started", self.services)
            if self.partitions > 1:
                for service in ("features", "inference"):
                    if self.replicas_of(service):
                        await self.balanced(service)
            else:
                for svc in self.features:
                    await self.settled(svc)
        finally:
            await c.aclose()

    async def balanced(self, service: str) -> dict[int, str]:
        """Every partition of ``service``'s group is held by one of its live, running replicas,
        and their counts differ by at most one: the holders, per partition."""
        c = await self.client()
        holders: dict[int, str | None] = {}
        try:
            async def even() -> bool:
                holders.update(await partition_holders(c, service, self.partitions))
                live = {s.consumer for s in self.replicas_of(service) if s.alive() and not s.paused}
                if any(h not in live for h in holders.values()):
                    return False
                counts = Counter(holders.values())
                held = [counts.get(name, 0) for name in live]
                return max(held) - min(held) <= 1

            await wait_until(even, EFFECT_TIMEOUT_S, f"{service}'s {self.partitions} partitions balanced over its "
                             f"live replicas", self.services)
            return dict(holders)  # type: ignore[arg-type]
        finally:
            await c.aclose()

    async def settled(self, svc: Service) -> None:
        """A features replica owns the groups or waits as a hot standby."""
        c = await self.client()
        try:
            async def ready() -> bool:
                return svc.says_it_owns(topics.KLINES) or "hot standby" in svc.log()

            await wait_until(ready, START_TIMEOUT_S, f"{svc} owner or standby", self.services)
        finally:
            await c.aclose()

    async def features_owner(self) -> Service:
        c = await self.client()
        try:
            holder: list[str | None] = [None]

            def owner(holder: str | None) -> Service | None:
                return next((s for s in self.features if s.consumer == holder and s.alive() and not s.paused
                             and s.says_it_owns(topics.KLINES)), None)

            async def owned() -> bool:
                holder[0] = await lease_holder(c, "features")
                return owner(holder[0]) is not None

            try:
                await wait_until(owned, EFFECT_TIMEOUT_S, "a live features owner", self.services)
            except AssertionError as exc:
                lease = await c.get(service_lease_key("features"))
                ttl = await c.pttl(service_lease_key("features"))
                states = ", ".join(f"{s}: alive {s.alive()} paused {s.paused} says it owns {s.says_it_owns(topics.KLINES)}"
                                   for s in self.features)
                stacks = "\n".join([f"--- {s} tasks\n{await s.task_stacks()}" for s in self.features])
                raise AssertionError(f"lease {lease!r} pttl {ttl} ms; {states}\n{stacks}\n{exc}") from None
            found = owner(holder[0])
            assert found is not None
            return found
        finally:
            await c.aclose()

    async def drain(self, expected: int) -> None:
        """Wait until klines.v1 holds ``expected`` candles, and every group was handed its
        stream's last entry and acknowledged everything."""
        c = await self.client()

        async def all_drained() -> bool:
            # Inference acknowledges a batch once its windows are queued for the models and
            # publishes the forecasts after: predictions.v1 is counted too (one model: persistence).
            return (await self.length(c, topics.KLINES) >= expected
                    and (not self.features or await self.length(c, topics.FEATURES) >= expected)
                    and (not self.inference or await self.length(c, topics.PREDICTIONS) >= expected)
                    and all([await drained(c, t, g, self.partitions) for t, g in self.groups()]))

        try:
            await wait_until(all_drained, DRAIN_TIMEOUT_S, "drained and acknowledged", self.services)
        finally:
            await c.aclose()

    async def length(self, c, topic: str) -> int:
        return sum([await c.xlen(k) for k in topics.stream_keys(topic, self.partitions)])

    def stop(self) -> None:
        for svc in self.services:
            svc.stop()

    async def stop_all(self, timeout: float = 30.0) -> None:
        """SIGTERM every process at once and wait for them on the event loop (the simulator in
        this process keeps answering ingest meanwhile); what has not exited in time is killed."""
        running = [s for s in self.services if s.alive()]
        for svc in running:
            if svc.paused:
                svc.resume()
            svc.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while any(s.alive() for s in running) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.stop()


class Faults:
    """The injected faults, counted per kind, and kills per service."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.p = pipeline
        self.redis = pipeline.server
        self.kills: Counter[str] = Counter()
        self.injected: Counter[str] = Counter()

    async def client(self):
        return await self.p.client()

    async def sigkill_and_restart(self, svc: Service) -> None:
        svc.kill()
        self.kills[svc.service] += 1
        self.injected[f"kill {svc.service}"] += 1
        svc.start()

    async def add_replica(self, service: str) -> Service:
        """One more replica of ``service``: it takes its share of the partitions from the others
        (they give theirs up after the batch in hand), and the partitions end balanced."""
        replicas = self.p.replicas_of(service)
        self.p.started[service] += 1
        env = self.p.features_env if service == "features" else self.p.common_env
        svc = Service(service, self.redis.url, self.p.folder, f"{service}-{self.p.started[service]}", **env)
        replicas.append(svc)
        svc.start()
        self.injected[f"{service} replica added"] += 1
        await self.p.balanced(service)
        return svc

    async def kill_replica(self, service: str) -> None:
        """SIGKILL a replica of ``service`` holding partitions, for good: its partitions move to the
        others once its leases expire (about one lease time)."""
        holders = await self.p.balanced(service)
        victim = next(s for s in self.p.replicas_of(service) if s.consumer in holders.values())
        victim.kill()
        self.p.replicas_of(service).remove(victim)
        self.kills[service] += 1
        self.injected[f"{service} replica killed for good"] += 1
        moved = await self.p.balanced(service)
        assert victim.consumer not in moved.values(), moved

    async def kill_features_owner(self) -> None:
        await self.sigkill_and_restart(await self.p.features_owner())

    async def refuse_writes(self, seconds: float) -> None:
        c = await self.client()
        try:
            await c.config_set("maxmemory-policy", "noeviction")
            await c.config_set("maxmemory", 1)
            self.injected["oom"] += 1
            await asyncio.sleep(seconds)  # the fault's duration, not a wait for an effect
        finally:
            await c.config_set("maxmemory", 0)
            await c.aclose()

    async def read_only(self, seconds: float) -> None:
        """Redis made a replica of a master that accepts TCP connections and never answers, so
        the sync never starts and the dataset stays; writes fail with READONLY. (A real, empty
        master would complete a full sync and replace the dataset with its own: nothing.)"""
        dummy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        dummy.bind(("127.0.0.1", 0))
        dummy.listen(8)  # the kernel accepts; nobody reads or answers
        c = await self.client()
        key = topics.stream_key(topics.KLINES)
        try:
            before = await c.xlen(key)
            await c.execute_command("REPLICAOF", "127.0.0.1", dummy.getsockname()[1])
            self.injected["read-only"] += 1

            async def refused() -> bool:
                try:
                    await c.set(f"{topics.KEY_PREFIX}:fault-probe", "1")
                except rex.ReadOnlyError:
                    return True
                return False

            await wait_until(refused, 10, "Redis refuses writes (READONLY)")
            during = await c.xlen(key)
            info = await c.info("replication")
            assert info["role"] == "slave" and info["master_link_status"] == "down", info
            await asyncio.sleep(seconds)  # the fault's duration, not a wait for an effect
            after = await c.xlen(key)
            # The dataset survived becoming a replica: nothing was flushed by a sync.
            assert before <= during == after, (before, during, after)
        finally:
            await c.execute_command("REPLICAOF", "NO", "ONE")
            await c.aclose()
            dummy.close()

    async def delete_group(self, topic: str, group: str) -> None:
        c = await self.client()
        try:
            await c.xgroup_destroy(topics.stream_key(topic), group)
            self.injected[f"group deleted ({group})"] += 1
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
        self.injected["redis restart"] += 1

    async def add_features_replica(self) -> Service:
        """A second features replica beside the first: it must wait as a hot standby."""
        self.p.replicas += 1
        svc = Service("features", self.redis.url, self.p.folder, f"features-{self.p.replicas}", **self.p.features_env)
        self.p.features.append(svc)
        svc.start()
        self.injected["second features replica"] += 1
        await self.p.settled(svc)
        return svc

    async def kill_owner_standby_takes_over(self) -> None:
        """The owner dies for good; the standby takes over."""
        owner = await self.p.features_owner()
        owner.kill()
        self.p.features.remove(owner)
        self.kills["features"] += 1
        self.injected["owner killed, standby takes over"] += 1
        await self.p.features_owner()

    async def pause_features_owner(self) -> None:
        """SIGSTOP the ordered owner past its lease: the standby takes the lease, claims what the
        paused one held and goes on; then SIGCONT. The resumed replica finds its lease gone
        (fenced: its acknowledgements are refused) and goes back to standby."""
        if len(self.p.features) < 2:
            await self.add_features_replica()
        owner = await self.p.features_owner()
        c = await self.client()
        try:
            lost_before = owner.log().count("lost ownership")
            at = await c.get(position_key(topics.KLINES, "features"))
            owner.pause()
            self.injected["features owner paused past its lease"] += 1
            holder: list[str | None] = [None]

            async def taken_over() -> bool:
                holder[0] = await lease_holder(c, "features")
                return holder[0] is not None and holder[0] != owner.consumer

            await wait_until(taken_over, EFFECT_TIMEOUT_S, "the standby took the lease", self.p.services)
            # Everything the paused owner held was claimed, and the new owner acknowledges past
            # where the paused one stopped (once the stream has gone beyond it).
            await wait_until(lambda: self._nothing_pending(c, topics.KLINES, "features", owner.consumer),
                             EFFECT_TIMEOUT_S, "the paused owner's entries claimed", self.p.services)

            async def moved_on() -> bool:
                last = await c.xrevrange(topics.stream_key(topics.KLINES), count=1)
                if not last or _id(last[0][0]) <= _id(at):
                    return True  # nothing beyond it yet
                return _id(await c.get(position_key(topics.KLINES, "features"))) > _id(at)

            await wait_until(moved_on, EFFECT_TIMEOUT_S, "the new owner acknowledging", self.p.services)
            owner.resume()
            await wait_until(lambda: now(owner.log().count("lost ownership") > lost_before), EFFECT_TIMEOUT_S,
                             f"{owner} resumed and noticed it lost ownership", self.p.services)
            # Fenced: it took no new entries after the takeover (the new owner would never see
            # entries pending on another consumer while it runs).
            stuck = await pending_of(c, topics.KLINES, "features", owner.consumer)
            assert stuck == 0, f"{owner} took {stuck} entries of klines.v1 after losing its lease"
        finally:
            await c.aclose()

    async def stutter_features(self, rng, times: int = 5) -> None:
        """Features replicas stopped and continued at random, for random lengths around the lease
        time (a VM's steal time, a long GC pause): stops land anywhere, in a takeover's restore
        and recovery too."""
        if len(self.p.features) < 2:
            await self.add_features_replica()
        for _ in range(times):
            svc = rng.choice([s for s in self.p.features if s.alive()])
            svc.pause()
            await asyncio.sleep(rng.uniform(0.5, 2.6))  # the stop's length, not a wait for an effect
            svc.resume()
            await asyncio.sleep(rng.uniform(0.0, 0.05))
        self.injected["features replicas stuttering"] += 1

    @staticmethod
    async def _nothing_pending(c, topic: str, group: str, consumer: str) -> bool:
        return await pending_of(c, topic, group, consumer) == 0

    async def _pause_holding(self, c, tries: int = 10) -> tuple[Service, list[bytes]]:
        """SIGSTOP an archiver inside its blocking read, so the candles Redis hands it while it is
        stopped are ones it cannot have archived: (it, the ids it holds)."""
        key = topics.stream_key(topics.KLINES)
        for attempt in range(tries):
            # a group deleted by an earlier fault is recreated on the archivers' next read
            await wait_until(lambda: group_started(c, topics.KLINES, "archive"), EFFECT_TIMEOUT_S,
                             "the archive group (re)created", self.p.services)
            svc = self.p.archivers[attempt % len(self.p.archivers)]
            svc.pause()
            held: list[list[bytes]] = [[]]

            async def holds() -> bool:
                try:
                    rows = await c.xpending_range(key, "archive", min="-", max="+", count=10_000,
                                                  consumername=svc.consumer)
                except rex.ResponseError:  # NOGROUP: deleted, not recreated yet (the archiver is stopped)
                    return False
                held[0] = [r["message_id"] for r in rows]
                return bool(held[0])

            # Stopped with entries pending, it may have archived them already (stopped before its
            # XACK); stopped between acknowledging and reading, it is handed nothing: resume, retry.
            if not await holds():
                try:
                    await wait_until(holds, 3, "the paused archiver is handed entries")
                    return svc, held[0]
                except AssertionError:
                    pass
            svc.resume()
            await asyncio.sleep(0.1 * (attempt + 1))  # let it run a moment before the next try
        raise AssertionError(f"no archiver was handed entries while paused in its read ({tries} tries)")

    async def pause_archiver(self) -> int:
        """SIGSTOP an archiver holding pending entries, past the reclaim idle time: the other
        replica must reclaim and archive them while it is stopped; then SIGCONT (it finishes its
        stale batch: archived once all the same). Returns how many entries were reclaimed."""
        assert len(self.p.archivers) >= 2, "a competing pause needs a second archiver"
        c = await self.client()
        try:
            svc, held = await self._pause_holding(c)
            self.injected["archiver paused past the reclaim time"] += 1
            await wait_until(lambda: self._nothing_pending(c, topics.KLINES, "archive", svc.consumer),
                             EFFECT_TIMEOUT_S, f"{svc}'s {len(held)} pending entries reclaimed", self.p.services)
            svc.resume()
            return len(held)
        finally:
            await c.aclose()

    async def archiver_dies_holding_entries_and_group_deleted(self) -> int:
        """An archiver dies while it holds entries another replica has since acknowledged past;
        the group is deleted (as by a failover to a replica without it) before anyone reclaims
        them; the archiver restarts. The recreated group must still hand those entries out.
        Returns how many entries the dead archiver held."""
        assert len(self.p.archivers) >= 2, "needs a second archiver acknowledging past the first"
        c = await self.client()
        try:
            svc, held = await self._pause_holding(c)
            newest = max(held, key=_id)

            async def acknowledged_past() -> bool:
                # entries newer than the held ones were handed out, and all of them acknowledged
                key = topics.stream_key(topics.KLINES)
                group = next(g for g in await c.xinfo_groups(key) if g["name"] == b"archive")
                newer = await c.xpending_range(key, "archive", min=f"({newest.decode()}", max="+", count=1)
                return _id(group["last-delivered-id"]) > _id(newest) and not newer

            await wait_until(acknowledged_past, EFFECT_TIMEOUT_S, "the other archiver acknowledging past them",
                             self.p.services)
            svc.kill()
            self.kills[svc.service] += 1
            await c.xgroup_destroy(topics.stream_key(topics.KLINES), "archive")
            self.injected["archiver killed holding entries, group deleted"] += 1
            svc.start()
            return len(held)
        finally:
            await c.aclose()


def verify(url: str, candles: dict[str, list[Kline]], klines: list[dict] | None, features: list[dict] | None,
           predictions: list[dict] | None, archive: ParquetArchive | None = None) -> dict[str, int]:
    """Exactly one event per candle per stream, in order; values equal to the candles (klines,
    archive) and to the batch computation (features)."""
    figures = {"events checked": 0, "lost": 0, "doubled": 0}
    names = list(get_feature_set(FEATURE_SET).features)

    def count(what: str, symbol: str, expected: list[int], got: list[int]) -> None:
        figures["lost"] += len(set(expected) - set(got))
        figures["doubled"] += len(got) - len(set(got))
        figures["events checked"] += len(got)
        assert got == expected, f"{what} {symbol}: {len(got)} events ({len(set(got))} distinct) for {len(expected)} candles"

    for symbol, ks in candles.items():
        expected = [k.open_time for k in ks]
        by_time = {k.open_time: k for k in ks}
        if klines is not None:
            got_k = [e for e in klines if e["symbol"] == symbol]
            count("klines.v1", symbol, expected, [e["open_time"] for e in got_k])
            for e in got_k:
                k = by_time[e["open_time"]]
                assert all(e[f] == getattr(k, f) for f in KLINE_FIELDS), (symbol, e, k)
        if features is not None:
            got_f = [e for e in features if e["symbol"] == symbol]
            count("features.v1", symbol, expected, [e["open_time"] for e in got_f])
            cols = [np.array([getattr(k, f) for k in ks]) for f in KLINE_FIELDS]
            ref = compute_batch(*cols, names=names)
            for i, e in enumerate(got_f):
                if e["warm"]:
                    for name in names:
                        assert e["values"][name] == pytest.approx(ref[name][i], rel=1e-9, abs=1e-9), (symbol, i, name)
        if predictions is not None:
            by_model: dict[str, list[int]] = {}
            for p in predictions:
                if p["symbol"] == symbol:
                    by_model.setdefault(p["model"], []).append(p["open_time"])
            assert by_model, f"no predictions for {symbol}"
            for model, ts in by_model.items():
                count(f"predictions.v1 {model}", symbol, expected, ts)
        if archive is not None:
            frame = archive.read(symbol, INTERVAL)
            count("archive", symbol, expected, frame["open_time"].tolist())
            for f in KLINE_FIELDS:
                assert frame[f].tolist() == [getattr(k, f) for k in ks], (symbol, f)
    return figures


async def run_scenario(tmp_path: Path, candles: dict[str, list[Kline]], plan, *, feed: str = "producer",
                       speed: float = 600.0, features: int = 1, inference: bool | int = True, archivers: int = 0,
                       reclaim_idle_ms: int = RECLAIM_IDLE_MS, step_s: float = 0.02, partitions: int = 1) -> dict:
    """Start the pipeline, feed the candles while ``plan(faults, pipeline, feed)`` injects faults,
    wait until everything is drained and acknowledged, check the outputs; the figures."""
    total = sum(len(ks) for ks in candles.values())
    with EmbeddedRedis(tmp_path / "redis", persistent=True) as server:
        url = server.url
        sim = SimFeed(candles, speed) if feed == "ingest" else None
        if sim is not None:
            await sim.sim.start(replay=False)
        pipeline = Pipeline(server, tmp_path, ingest=sim, features=features, inference=inference,
                            archivers=archivers, reclaim_idle_ms=reclaim_idle_ms, partitions=partitions)
        faults = Faults(pipeline)
        try:
            await pipeline.start()
            source = sim if sim is not None else Producer(url, candles, per_step=len(candles), step_s=step_s,
                                                          partitions=partitions)
            feeding = asyncio.create_task(source.run())
            try:
                await plan(faults, pipeline, source)
                await feeding
            finally:
                feeding.cancel()
            await pipeline.drain(total)
            # Read once every process has stopped (SIGTERM: queues drained): the final outputs,
            # to which nothing can be added any more.
            await pipeline.stop_all()
            klines = await read_topic(url, topics.KLINES)
            feats = await read_topic(url, topics.FEATURES) if features else None
            preds = await read_topic(url, topics.PREDICTIONS) if inference else None
        finally:
            pipeline.stop()
            if sim is not None:
                await sim.sim.stop()
        archive = ParquetArchive(str(pipeline.archive_root)) if archivers else None
        figures: dict = verify(url, candles, klines, feats, preds, archive)
    figures["kills survived"] = dict(faults.kills)
    figures["faults injected"] = dict(faults.injected)
    return figures


async def at(source, fraction: float, services=()) -> None:
    """Wait until the feed has offered ``fraction`` of its candles."""
    await wait_until(lambda: now(source.progress() >= fraction), DRAIN_TIMEOUT_S, f"{fraction:.0%} fed", services)


def report(name: str, figures: dict) -> str:
    def fmt(v) -> str:
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k}: {n}" for k, n in sorted(v.items())) + "}" if v else "{}"
        return str(v)

    return f"fault test ({name}): " + ", ".join(f"{k} {fmt(v)}" for k, v in figures.items())
