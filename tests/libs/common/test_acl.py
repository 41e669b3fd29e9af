"""The generated ACL on a real redis-server (7.0+, with ACLs on): every service's user can do what
its bus does (groups, the fenced reads and acknowledgements, the owner lease, guarded publishes,
dead letters, its state keys), and nothing else: an append to a topic it does not produce is
refused with NOPERM, by Redis, and the refusal is logged by the bus in one line."""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
import redis.exceptions as rex

from libs.common import acl, topics
from libs.common.bus import Bus
from libs.common.contracts import EVENT_TYPES
from libs.common.telemetry import ServiceMetrics
from tests.fuzz.samples import SAMPLES

PASSWORDS = {s: f"pw-{s}-0123456789" for s in topics.ACCESS}
ADMIN = "admin-0123456789"
# How each service reads each topic it consumes (its app's decorators).
ORDERED = {("features", topics.KLINES), ("inference", topics.FEATURES), ("inference", topics.MODELS),
           ("inference", topics.CHARTS)}
DEADLINE_S = 60.0


def redis7() -> str | None:
    exe = shutil.which("redis-server")
    if not exe:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"v=(\d+)\.(\d+)", out)
    return exe if m and (int(m.group(1)), int(m.group(2))) >= acl.MIN_REDIS_VERSION else None


needs_redis7 = pytest.mark.skipif(redis7() is None, reason="needs redis-server >= 7.0 on PATH (scripts/system-deps.sh)")


class AclRedis:
    """A throwaway redis-server with the generated ACL file, on a unix socket."""

    def __init__(self, folder: Path, acl_text: str) -> None:
        self.folder = folder
        (folder / "users.acl").write_text(acl_text)
        self.sock = folder / "redis.sock"
        self.proc = subprocess.Popen(
            [redis7(), "--port", "0", "--unixsocket", str(self.sock), "--aclfile", str(folder / "users.acl"),
             "--save", "", "--appendonly", "no", "--dir", str(folder)],
            stdout=open(folder / "redis.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis(unix_socket_path=str(self.sock), username=acl.ADMIN_USER, password=ADMIN).ping()
                break
            except (rex.ConnectionError, FileNotFoundError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError((folder / "redis.log").read_text()) from None
                time.sleep(0.05)

    def url(self, service: str) -> str:
        return f"unix://{acl.user_name(service)}:{PASSWORDS[service]}@{self.sock}"

    @property
    def admin_url(self) -> str:
        return f"unix://{acl.ADMIN_USER}:{ADMIN}@{self.sock}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def acl_redis(tmp_path):
    server = AclRedis(tmp_path, acl.acl_file(PASSWORDS, ADMIN))
    yield server
    server.stop()


def event(topic: str) -> Any:
    return EVENT_TYPES[topic].model_validate(SAMPLES[topic])


# --- the file itself ----------------------------------------------------------------------------


def test_every_topic_but_the_request_topics_has_one_producing_service_and_dead_letters_have_all():
    assert topics.producers(topics.KLINES) == ("ingest",)
    assert topics.producers(topics.FEATURES) == ("features",)
    assert topics.producers(topics.MODELS) == ("trainer",)
    assert topics.producers(topics.DATASETS) == ("operator",)
    assert set(topics.producers(topics.DEAD_LETTERS)) == set(topics.ACCESS)


def test_the_file_never_grants_xadd_on_a_topic_the_user_does_not_produce():
    text = acl.acl_file(PASSWORDS)
    for service, access in topics.ACCESS.items():
        (line,) = [ln for ln in text.splitlines() if ln.startswith(f"user {acl.user_name(service)} ")]
        assert PASSWORDS[service] not in line  # only the hash
        for selector in re.findall(r"\(([^)]*)\)", line):
            if "+xadd" in selector.split():
                keys = {k[1:] for k in selector.split() if k.startswith("~")}
                streams = {k for k in keys if k.endswith("}")}
                produced = {topics.stream_key(t) for t in access.produces}
                produced |= {f"klinebus:{{{t}#[1-9]*}}" for t in access.produces if t in topics.PARTITIONED}
                assert streams <= produced, (service, streams)
        assert "+@all" not in line and "~*" not in line.split()


def test_a_user_without_a_password_is_off():
    text = acl.acl_file({})
    assert all(" off " in ln for ln in text.splitlines() if ln.startswith("user "))


# --- on a real server -----------------------------------------------------------------------------


@needs_redis7
async def test_each_user_runs_its_bus_and_cannot_write_what_it_does_not_produce(acl_redis, caplog):
    admin = aioredis.Redis.from_url(acl_redis.admin_url)
    for t in topics.ALL_TOPICS:  # something to consume on every topic
        await admin.xadd(topics.stream_key(t), {"__data__": event(t).to_json()})
    try:
        for service, access in topics.ACCESS.items():
            await _one_service(acl_redis, service, access, admin, caplog)
    finally:
        await admin.aclose()


async def _one_service(server: AclRedis, service: str, access: topics.Access, admin, caplog) -> None:
    url = server.url(service)
    bus = Bus(service, url, consumer=f"{service}-1", metrics=ServiceMetrics(service, _registry()),
              owner_lease_ms=2000, monitor_interval_s=0.2, stale_consumer_ms=1)
    seen: dict[str, int] = {}
    for topic in access.consumes:
        model = EVENT_TYPES[topic]
        if (service, topic) in ORDERED:
            async def ordered(ev, entry_id, topic=topic):
                seen[topic] = seen.get(topic, 0) + 1
            ordered.__name__ = f"on_{topic}"
            bus.ordered(topic, model)(ordered)
        else:
            async def competing(ev, topic=topic):
                seen[topic] = seen.get(topic, 0) + 1
            competing.__annotations__ = {"ev": model}
            competing.__name__ = f"on_{topic}"
            bus.competing(topic)(competing)
    for topic in access.produces:
        bus.publisher(topic, EVENT_TYPES[topic])
    await asyncio.wait_for(bus.start(), DEADLINE_S)
    client = aioredis.Redis.from_url(url)
    try:
        # It consumed and acknowledged what was waiting on each of its topics.
        deadline = time.monotonic() + DEADLINE_S
        while not all(seen.get(t) for t in access.consumes) or not await _all_acked(admin, service, access):
            assert time.monotonic() < deadline, f"{service}: consumed {seen} of {access.consumes}"
            assert bus.alive(), f"{service}: {bus.fatal}"
            await asyncio.sleep(0.05)
        # It appends to what it produces: plain, and through the once-per-candle guard.
        for topic in access.produces:
            before = await admin.xlen(topics.stream_key(topic))
            await bus.publish(event(topic))
            if "open_time" in EVENT_TYPES[topic].model_fields and topic not in (topics.ALERTS, topics.DEAD_LETTERS):
                guard = bus.once_per_candle(topic, client)
                later = EVENT_TYPES[topic].model_validate(
                    {k: v + 7 * 60_000 if k.endswith(("open_time", "close_time")) else v for k, v in SAMPLES[topic].items()})
                assert (await guard.publish(later))[0]
            assert await admin.xlen(topics.stream_key(topic)) > before
        await bus.dead_letter("test", b"{", "malformed JSON: a test")
        # Its state keys.
        for topic, glob in access.state:
            key = topics.stream_companion_key(topic, glob.replace("*", "x"))
            await client.set(key, "1")
            assert await client.get(key) == b"1"
            await client.delete(key)
        # It reads any topic (history scans) and the dedupe hashes.
        for t in topics.ALL_TOPICS:
            assert await client.xrevrange(topics.stream_key(t), count=1)
        await client.hgetall(topics.stream_companion_key(topics.PREDICTIONS, "last-open-time"))
        # And nothing else.
        for t in topics.ALL_TOPICS:
            key = topics.stream_key(t)
            if t not in access.produces:
                with pytest.raises(rex.NoPermissionError):
                    await client.xadd(key, {"__data__": event(t).to_json()})
            with pytest.raises(rex.NoPermissionError):
                await client.delete(key)
            with pytest.raises(rex.NoPermissionError):
                await client.set(key, "x")
            if t not in access.consumes:
                with pytest.raises(rex.NoPermissionError):
                    await client.xgroup_create(key, f"{service}-evil", id="0")
        for other, other_access in topics.ACCESS.items():
            if other != service:
                with pytest.raises(rex.NoPermissionError):
                    await client.set(f"{topics.KEY_PREFIX}:owner:{other}", "stolen")
        for cmd in (("FLUSHALL",), ("CONFIG", "GET", "*"), ("KEYS", "*"), ("ACL", "LIST"), ("SHUTDOWN",), ("SCRIPT", "FLUSH")):
            with pytest.raises(rex.NoPermissionError):
                await client.execute_command(*cmd)
    finally:
        await client.aclose()
        await bus.stop()


async def _all_acked(admin, service: str, access: topics.Access) -> bool:
    for t in access.consumes:
        for g in await admin.xinfo_groups(topics.stream_key(t)):
            if g["name"].decode() == service and g["pending"] != 0:
                return False
    return True


def _registry():
    from prometheus_client import CollectorRegistry

    return CollectorRegistry()


@needs_redis7
async def test_a_service_publishing_a_topic_it_does_not_produce_is_refused_and_logged_once(acl_redis, caplog):
    """archive's user, with a handler that (wrongly) publishes to features.v1: Redis refuses the
    append with NOPERM; nothing reaches features.v1; the candle is neither acknowledged nor
    dead-lettered (fixing the ACL or the code lets it through); the bus logs one line."""
    caplog.set_level(logging.INFO, logger="klinebus.bus")
    admin = aioredis.Redis.from_url(acl_redis.admin_url)
    await admin.xadd(topics.stream_key(topics.KLINES), {"__data__": event(topics.KLINES).to_json()})
    bus = Bus("archive", acl_redis.url("archive"), consumer="archive-1", metrics=ServiceMetrics("archive", _registry()))
    bus.publisher(topics.FEATURES, EVENT_TYPES[topics.FEATURES])
    tried = []

    async def on_kline(ev: EVENT_TYPES[topics.KLINES]) -> None:  # type: ignore[valid-type]
        tried.append(ev)
        await bus.publish(event(topics.FEATURES))

    bus.competing(topics.KLINES)(on_kline)
    await bus.start()
    try:
        deadline = time.monotonic() + DEADLINE_S
        while len(tried) < 3:  # refused, waited out, tried again
            assert time.monotonic() < deadline, caplog.text
            await asyncio.sleep(0.05)
        assert await admin.xlen(topics.stream_key(topics.FEATURES)) == 0
        assert await admin.xlen(topics.stream_key(topics.DEAD_LETTERS)) == 0
        (group,) = await admin.xinfo_groups(topics.stream_key(topics.KLINES))
        assert group["pending"] == 1
        lines = [r.getMessage() for r in caplog.records if "no permissions" in r.getMessage()]
        assert len(lines) == 1, lines
        assert "\n" not in lines[0] and "archive" in lines[0]
        # Redis itself recorded who was refused what.
        (entry,) = await admin.acl_log(1)
        entry = {k: v.decode() if isinstance(v, bytes) else v for k, v in entry.items()}
        assert (entry["username"], entry["reason"], entry["object"]) == ("klinebus-archive", "key", topics.stream_key(topics.FEATURES))
    finally:
        await bus.stop()
        await admin.aclose()


@needs_redis7
def test_klinebus_acl_prints_a_file_redis_accepts(tmp_path):
    import os
    import sys

    env = {**os.environ, **{acl.password_env(s): p for s, p in PASSWORDS.items()}, acl.password_env("admin"): ADMIN}
    out = subprocess.run([sys.executable, "-m", "klinebus", "acl"], capture_output=True, text=True, env=env, check=True,
                         cwd=Path(__file__).resolve().parents[3]).stdout
    assert all(p not in out for p in PASSWORDS.values())
    server = AclRedis(tmp_path, out)
    try:
        c = redis.Redis.from_url(server.url("features"))
        assert c.acl_whoami() == "klinebus-features"
        c.close()
    finally:
        server.stop()


def test_the_declarations_match_what_each_service_app_subscribes_and_publishes(monkeypatch, tmp_path):
    """The ACL is generated from topics.ACCESS: a service whose app reads or writes a topic its
    declaration lacks would be refused in production, so the two are compared here."""
    from klinebus.cli import SERVICES, app_module
    from libs.common.settings import load_settings

    monkeypatch.setenv("KLINEBUS_REDIS_URL", "redis://127.0.0.1:1/0")  # create() does not connect
    monkeypatch.setenv("KLINEBUS_DATA_DIR", str(tmp_path))
    assert set(SERVICES) == set(topics.ACCESS) - {"operator"}
    for service in SERVICES:
        module = app_module(service)
        bus = module.create(load_settings(module.SETTINGS), "redis://127.0.0.1:1/0").bus
        access = topics.ACCESS[service]
        assert sorted({s.topic for s in bus.subscriptions}) == sorted(access.consumes), service
        assert sorted(bus._publishers) == sorted(access.produces), service


@needs_redis7
def test_the_commands_form_sets_up_the_same_users(tmp_path):
    """`klinebus acl --format commands`: ACL SETUSER lines, as redis-cli would send them word by
    word (Redis joins a selector's words from '(' to ')')."""
    server = AclRedis(tmp_path, acl.acl_file({}, ADMIN))  # only the admin can log in
    try:
        admin = redis.Redis.from_url(server.admin_url)
        for line in acl.acl_setuser_commands(PASSWORDS).splitlines():
            assert admin.execute_command(*line.split()) in (b"OK", "OK", True)
        admin.close()
        c = redis.Redis.from_url(server.url("trainer"))
        assert c.xadd(topics.stream_key(topics.MODELS), {"__data__": b"{}"})
        with pytest.raises(rex.NoPermissionError):
            c.xadd(topics.stream_key(topics.DATASETS), {"__data__": b"{}"})
        c.close()
    finally:
        server.stop()


@needs_redis7
async def test_acl_users_work_on_a_redis_cluster(redis_cluster_url):
    """The same users on every node of a real 3-master cluster (ACLs are per node): features'
    user consumes klines.v1 through its group and publishes features.v1 across slots, and may not
    append to klines.v1."""
    from urllib.parse import urlsplit

    import redis.asyncio.cluster as acluster

    seed = urlsplit(redis_cluster_url)
    admin = acluster.RedisCluster(host=seed.hostname, port=seed.port)
    await admin.initialize()
    for node in admin.get_nodes():  # ACL SETUSER on each node: Redis does not share users between nodes
        for line in acl.acl_setuser_commands(PASSWORDS).splitlines():
            await admin.execute_command(*line.split(), target_nodes=node)
    for t in (topics.KLINES, topics.FEATURES, topics.DEAD_LETTERS):
        await admin.delete(topics.stream_key(t), topics.stream_companion_key(t, "acked:features"),
                           topics.stream_companion_key(t, "owner:features"))
    await admin.delete(f"{topics.KEY_PREFIX}:owner:features")
    await admin.xadd(topics.stream_key(topics.KLINES), {"__data__": event(topics.KLINES).to_json()})
    url = f"redis+cluster://{acl.user_name('features')}:{PASSWORDS['features']}@{seed.hostname}:{seed.port}"
    bus = Bus("features", url, consumer="features-c", metrics=ServiceMetrics("features", _registry()))
    bus.publisher(topics.FEATURES, EVENT_TYPES[topics.FEATURES])

    async def on_kline(ev, entry_id):
        await bus.publish(event(topics.FEATURES))

    bus.ordered(topics.KLINES, EVENT_TYPES[topics.KLINES])(on_kline)
    await asyncio.wait_for(bus.start(), DEADLINE_S)
    user = acluster.RedisCluster.from_url(url.replace("redis+cluster://", "redis://"))
    try:
        deadline = time.monotonic() + DEADLINE_S
        while await admin.xlen(topics.stream_key(topics.FEATURES)) < 1:
            assert time.monotonic() < deadline and bus.alive(), bus.fatal
            await asyncio.sleep(0.05)
        with pytest.raises(rex.NoPermissionError):
            await user.xadd(topics.stream_key(topics.KLINES), {"__data__": b"{}"})
    finally:
        await bus.stop()
        await user.aclose()
        for node in admin.get_nodes():  # the cluster is the session's: leave it as found
            await admin.execute_command("ACL", "DELUSER", *map(acl.user_name, topics.ACCESS), target_nodes=node)
        await admin.aclose()


@needs_redis7
async def test_partition_keys_are_covered_for_the_services_that_use_them(acl_redis):
    """With P=4, features as its ACL user: consumes every partition of klines.v1 (fenced reads,
    acks, leases, membership), publishes features.v1 to every partition through the guard, writes
    its per-partition state; ingest publishes to every partition of klines.v1; features may not
    append to another partition's klines.v1."""
    from tests.libs.common.test_bus_partitions import SYMBOLS, kline

    parts = 4
    ingest = Bus("ingest", acl_redis.url("ingest"), consumer="i", partitions=parts,
                 metrics=ServiceMetrics("ingest", _registry()))
    ingest.publisher(topics.KLINES, EVENT_TYPES[topics.KLINES])
    await ingest.start()
    features = Bus("features", acl_redis.url("features"), consumer="f", partitions=parts, owner_lease_ms=900,
                   metrics=ServiceMetrics("features", _registry()))
    features.publisher(topics.FEATURES, EVENT_TYPES[topics.FEATURES])
    client = aioredis.Redis.from_url(acl_redis.url("features"))
    got: list[Any] = []

    @features.ordered_batch(topics.KLINES, EVENT_TYPES[topics.KLINES])
    async def handle(events, ids) -> None:
        got.extend(events)

    @features.on_owner
    async def restore(partition: int) -> None:
        await client.hset(topics.stream_companion_key(topics.FEATURES, "engine-state", partition), "x", "1")

    admin = aioredis.Redis.from_url(acl_redis.admin_url)
    try:
        await ingest.once_per_candle(topics.KLINES, admin).publish_many([kline(s, 0) for s in SYMBOLS])
        guard_client = aioredis.Redis.from_url(acl_redis.url("ingest"))
        await ingest.once_per_candle(topics.KLINES, guard_client).publish_many([kline(s, 1) for s in SYMBOLS])
        await guard_client.aclose()
        await features.start()
        assert features.owned_partitions() == frozenset(range(parts))
        deadline = time.monotonic() + DEADLINE_S
        while len(got) < 2 * len(SYMBOLS):
            assert time.monotonic() < deadline and features.fatal is None, features.fatal
            await asyncio.sleep(0.02)
        for p in range(1, parts):
            assert await admin.hget(topics.stream_companion_key(topics.FEATURES, "engine-state", p), "x") == b"1"
            with pytest.raises(rex.NoPermissionError):
                await client.xadd(topics.stream_key(topics.KLINES, p), {"__data__": "{}"})
    finally:
        await features.stop()
        await ingest.stop()
        await client.aclose()
        await admin.aclose()
