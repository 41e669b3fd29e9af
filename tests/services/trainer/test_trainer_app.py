"""datasets.v1 -> models.v1 through the trainer service on a real Redis, from a real Parquet archive."""

from __future__ import annotations

import json

import pytest

from klinebus.cli import main

from libs.common import topics
from libs.common.archive import ParquetArchive
from libs.common.bus import redis_client
from libs.common.contracts import DatasetBuildRequest
from libs.common.klines import read_kline_csv
from libs.common.model_package import Registry
from libs.common.signing import Keyring
from services.trainer.app import create, progress_key
from services.trainer.settings import TrainerSettings
from tests.streams import add_events, wait_for_events

from .conftest import BTC_15M

pytestmark = pytest.mark.slow
CONTROL_KEYS = "tests-1:" + "0123456789abcdef" * 4  # a test key (KLINEBUS_CONTROL_KEYS)
KEYRING = Keyring.parse(CONTROL_KEYS)


def _request(request_id: str, *, signed: bool = True, **over) -> DatasetBuildRequest:
    klines = read_kline_csv(BTC_15M)
    fields = dict(request_id=request_id, model_kind="lstm-close", symbols=["BTCUSDT"], intervals=["15m"],
                  start=klines[0].open_time, end=klines[-1].open_time, feature_set="lstm-35-v1", horizon=2)
    fields.update(over)
    req = DatasetBuildRequest(**fields)
    return KEYRING.sign(topics.DATASETS, req) if signed else req


async def test_request_to_published_model_and_refusals(redis_url, tmp_path, capsys):
    ParquetArchive(str(tmp_path / "archive")).write(read_kline_csv(BTC_15M))
    settings = TrainerSettings(data_dir=tmp_path, archive_url=str(tmp_path / "archive"), registry_url=str(tmp_path / "reg"),
                               max_epochs=1, max_batches_per_epoch=2, device="cpu", reclaim_idle_ms=1000,
                               control_keys=CONTROL_KEYS)
    runtime = create(settings, redis_url)
    await runtime.start(http=False)
    try:
        await add_events(redis_url, [_request("job-1")])
        (model,) = await wait_for_events(redis_url, topics.MODELS, 1, timeout=240)
        first = read_kline_csv(BTC_15M)[0].open_time
        await add_events(redis_url, [
            _request("job-unknown", symbols=["NOPEUSDT"]),
            _request("job-empty", start=first - 10 * 86_400_000, end=first - 86_400_000),
            _request("job-short", end=first + 100 * 900_000),
            _request("job-1"),  # delivered again: the finished job's event is said again, nothing retrained
            # datasets.v1 is signed: none of these is trained (each would be a job otherwise)
            _request("job-unsigned", signed=False),
            Keyring.parse("other:" + "z" * 40).sign(topics.DATASETS, _request("job-stranger", signed=False)),
            _request("job-replayed").model_copy(update={"request_id": "job-replayed-2", "symbols": ["ETHUSDT"]}),
        ])
        dead = await wait_for_events(redis_url, topics.DEAD_LETTERS, 6, timeout=120)
        models = await wait_for_events(redis_url, topics.MODELS, 2, timeout=120)
        client = redis_client(redis_url)
        try:
            progress = await client.hgetall(progress_key("job-1"))
        finally:
            await client.aclose()
    finally:
        await runtime.stop()
    assert model["model"] == "lstm-close-BTCUSDT-15m" and model["version"] == "1"
    reg = Registry(str(tmp_path / "reg"))
    meta = reg.verify(model["model"], model["version"], expected_sha256=model["sha256"])
    assert model["uri"] == reg.uri(model["model"], "1")
    assert model["promoted"] == meta.promoted and model["baseline_metrics"]["persistence"]["mae"] > 0
    assert meta.horizons == [1, 2] and meta.ranges.test.start > meta.ranges.train.end
    assert len(models) == 2 and models[1] == models[0]
    assert reg.versions(model["model"]) == ["1"]
    reasons = sorted(d["reason"] for d in dead)
    assert len(reasons) == 6, reasons
    assert KEYRING.verify(topics.MODELS, models[0]) == "tests-1"  # the trainer signs what it publishes
    assert sum(r.startswith("unsigned: datasets.v1") for r in reasons) == 1
    assert sum(r.startswith("unknown_key: datasets.v1") for r in reasons) == 1
    assert sum(r.startswith("bad_signature: datasets.v1") for r in reasons) == 1
    assert any("job-unknown" in r and "no candles for NOPEUSDT 15m" in r for r in reasons)
    assert any("job-empty" in r and "time range" in r for r in reasons)
    assert any("job-short" in r and "too little history" in r for r in reasons)
    assert all(d["source"] == topics.DATASETS for d in dead)
    assert progress[b"stage"] == b"published"
    assert main(["train-status", "--redis-url", redis_url, "--request-id", "job-1", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["stage"] == "published" and status["info"]["version"] == "1"
    assert main(["train-status", "--redis-url", redis_url]) == 0
    listed = capsys.readouterr().out
    assert "job-1: published" in listed and "job-short: refused" in listed
    # nothing half-written: one dataset folder per accepted job, no staging folders anywhere
    assert sorted(p.name for p in (tmp_path / "trainer").iterdir()) == ["job-1"]  # no refused request was built
    assert not [p for p in (tmp_path / "reg").rglob(".staging-*")]


async def test_a_restart_mid_job_publishes_one_whole_model(redis_url, tmp_path):
    """Stop the service while it trains: nothing is published; after a restart the job runs again
    and exactly one complete package and one models.v1 event come out."""
    import asyncio
    import time

    ParquetArchive(str(tmp_path / "archive")).write(read_kline_csv(BTC_15M))
    common = dict(data_dir=tmp_path, archive_url=str(tmp_path / "archive"), registry_url=str(tmp_path / "reg"),
                  device="cpu", consumer_name="trainer-0", reclaim_idle_ms=60_000, control_keys=CONTROL_KEYS)
    first = create(TrainerSettings(**common, max_epochs=1000, max_batches_per_epoch=1), redis_url)
    await first.start(http=False)
    client = redis_client(redis_url)
    try:
        await add_events(redis_url, [_request("job-r")])
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if (await client.hget(progress_key("job-r"), "stage")) in (b"epoch", b"batch"):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the job never started training")
    finally:
        await first.stop()  # returns once the job thread has stopped
    assert await client.xlen(topics.stream_key(topics.MODELS)) == 0
    assert not list(tmp_path.glob("reg/**/klinebus.json"))  # no package, not even a staged one
    second = create(TrainerSettings(**common, max_epochs=1, max_batches_per_epoch=2), redis_url)
    await second.start(http=False)
    try:
        (model,) = await wait_for_events(redis_url, topics.MODELS, 1, timeout=240, settle=1.0)
    finally:
        await second.stop()
        await client.aclose()
    reg = Registry(str(tmp_path / "reg"))
    assert reg.versions(model["model"]) == ["1"]
    reg.verify(model["model"], "1", expected_sha256=model["sha256"])


async def test_without_a_key_the_trainer_refuses_every_request(redis_url, tmp_path):
    settings = TrainerSettings(data_dir=tmp_path, archive_url=str(tmp_path / "archive"), registry_url=str(tmp_path / "reg"),
                               device="cpu")
    runtime = create(settings, redis_url)
    await runtime.start(http=False)
    try:
        await add_events(redis_url, [_request("job-nokey")])
        (dead,) = await wait_for_events(redis_url, topics.DEAD_LETTERS, 1, timeout=60)
    finally:
        await runtime.stop()
    assert dead["source"] == topics.DATASETS and dead["reason"].startswith("no_control_key: ")
    assert not (tmp_path / "trainer" / "job-nokey").exists()
