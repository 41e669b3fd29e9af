"""The real services, each as its own process with its own ACL user, on a redis-server 7 with ACLs
on: ingest (fed by the exchange simulator over websocket + REST) -> features -> inference, with
the archiver, end to end (exactly one event per candle on every stream); charts, alerts and trainer
start and handle events, vlm starts and joins its group; and Redis refused nothing any of them tried except the optional checks
that a least-privilege user is expected not to have (CONFIG GET of the start-up check)."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from libs.common import acl, topics
from libs.common.archive import ParquetArchive
from libs.common.contracts import EVENT_TYPES
from tests.fuzz.samples import SAMPLES
from tests.integration.fault_harness import (
    DRAIN_TIMEOUT_S,
    FEATURE_SET,
    START_TIMEOUT_S,
    Service,
    SimFeed,
    drained,
    group_started,
    shipped,
    verify,
    wait_until,
)
from tests.libs.common.test_acl import ADMIN, PASSWORDS, AclRedis, needs_redis7
from tests.streams import read_topic

# Refusals a least-privilege user is expected to meet: the start-up check of the eviction policy
# (CONFIG GET), which says in one line that it could not check and goes on.
EXPECTED_REFUSALS = {"config|get"}


@needs_redis7
@pytest.mark.slow
async def test_every_service_runs_as_its_own_acl_user(tmp_path):
    (tmp_path / "redis").mkdir()
    server = AclRedis(tmp_path / "redis", _acl_file())
    candles = shipped(("BTCUSDT", "ETHUSDT"), 90)
    total = sum(len(ks) for ks in candles.values())
    sim = SimFeed(candles, speed=600.0)
    await sim.sim.start(replay=False)
    archive_root = tmp_path / "archive"
    svc = {
        "ingest": Service("ingest", server.url("ingest"), tmp_path, "ingest-1", **sim.ingest_env()),
        "features": Service("features", server.url("features"), tmp_path, "features-1", KLINEBUS_FEATURE_SET=FEATURE_SET,
                            KLINEBUS_WARMUP_SOURCE="none", KLINEBUS_CHECKPOINT_EVERY_S="0.5"),
        "inference": Service("inference", server.url("inference"), tmp_path, "inference-1"),
        "archive": Service("archive", server.url("archive"), tmp_path, "archive-1", KLINEBUS_ARCHIVE_URL=str(archive_root)),
        "charts": Service("charts", server.url("charts"), tmp_path, "charts-1"),
        "alerts": Service("alerts", server.url("alerts"), tmp_path, "alerts-1"),
        "trainer": Service("trainer", server.url("trainer"), tmp_path, "trainer-1"),
        # vlm's model server is not part of this test: it starts, joins its group and waits for it.
        "vlm": Service("vlm", server.url("vlm"), tmp_path, "vlm-1", KLINEBUS_BACKEND="remote",
                       KLINEBUS_REMOTE_URL=f"http://127.0.0.1:{_closed_port()}"),
    }
    groups = [(topics.KLINES, "features"), (topics.FEATURES, "inference"), (topics.KLINES, "archive"),
              (topics.KLINES, "charts"), (topics.ALERTS, "alerts"), (topics.DATASETS, "trainer"),
              (topics.CHARTS, "vlm")]
    admin = aioredis.Redis.from_url(server.admin_url, socket_timeout=5)
    procs = list(svc.values())
    try:
        for s in procs:
            s.start()
        for topic, group in groups:
            await wait_until(lambda: group_started(admin, topic, group), START_TIMEOUT_S, f"{group} started", procs)
        await wait_until(lambda: _now(svc["features"].says_it_owns(topics.KLINES)), START_TIMEOUT_S,
                         "features owns klines", procs)
        # One event each for alerts and trainer (the trainer refuses an unsigned request: a dead letter it writes).
        await admin.xadd(topics.stream_key(topics.ALERTS),
                         {"__data__": EVENT_TYPES[topics.ALERTS].model_validate(SAMPLES[topics.ALERTS]).to_json()})
        await admin.xadd(topics.stream_key(topics.DATASETS),
                         {"__data__": EVENT_TYPES[topics.DATASETS].model_validate(SAMPLES[topics.DATASETS]).to_json()})
        await asyncio.wait_for(sim.run(), DRAIN_TIMEOUT_S)

        async def all_drained() -> bool:
            if await admin.xlen(topics.stream_key(topics.KLINES)) < total:
                return False
            for topic, group in groups:
                if group != "vlm" and not await drained(admin, topic, group):
                    return False
            return True

        await wait_until(all_drained, DRAIN_TIMEOUT_S, "every group drained", procs)
        for s in procs:
            assert s.alive(), f"{s} died: {s.tail()}"
        letters = await read_topic(server.admin_url, topics.DEAD_LETTERS)
        assert [d["service"] for d in letters if d["source"] == topics.DATASETS] == ["trainer"]
        for s in procs:
            s.stop()
        klines = await read_topic(server.admin_url, topics.KLINES)
        feats = await read_topic(server.admin_url, topics.FEATURES)
        preds = await read_topic(server.admin_url, topics.PREDICTIONS)
        figures = verify(server.admin_url, candles, klines, feats, preds, ParquetArchive(str(archive_root)))
        assert figures["lost"] == 0 and figures["doubled"] == 0 and figures["events checked"] >= 3 * total
        for s in procs:  # the URL with its password was in every process's environment and settings
            assert PASSWORDS[s.service] not in s.log(), f"{s} logged its Redis password"
        # What Redis refused, over the whole run.
        refused = {(e["username"], e["object"]) for e in _decoded(await admin.acl_log(128))}
        print("refused by Redis over the run:", sorted(refused))
        assert {obj for _, obj in refused} <= EXPECTED_REFUSALS, refused
    finally:
        for s in procs:
            if s.alive():
                s.kill()
        await sim.sim.stop()
        await admin.aclose()
        server.stop()


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _acl_file() -> str:
    return acl.acl_file(PASSWORDS, ADMIN)


async def _now(value: bool) -> bool:
    return value


def _decoded(entries: list[dict]) -> list[dict]:
    return [{k: v.decode() if isinstance(v, bytes) else v for k, v in e.items()} for e in entries]
