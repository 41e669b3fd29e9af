"""models.v1 is a signed control topic, and an announced package is loaded only from a configured
source and only if every file is what was announced: the inference service on a real Redis with
real packages. Each refusal is a dead letter with one line and a metric; the version serving
keeps serving."""

from __future__ import annotations

import json
import logging


from libs.common import topics
from libs.common.contracts import DeadLetter
from libs.common.signing import Keyring
from tests.services.inference.models import KEYRING, feature_events, publish
from tests.services.inference.test_app import FIRST, count_of, metric, poll, runtime
from tests.streams import add_events, read_topic, wait_for_events

MODEL = "ctl-BTCUSDT-15m"  # each test serves its own name (model_info is process-wide)


def serving(version: str, model: str = MODEL):
    async def cond() -> bool:
        return metric("model_info", model=model, version=version, kind="lstm-close") == 1.0
    return cond


async def letters(url: str, n: int) -> list[DeadLetter]:
    return [DeadLetter.model_validate(e) for e in await wait_for_events(url, topics.DEAD_LETTERS, n)]


async def test_unsigned_forged_and_altered_announcements_are_dead_letters(redis_url, tmp_path):
    publish(tmp_path / "reg", tmp_path, MODEL, seed=1)
    v2 = publish(tmp_path / "reg", tmp_path, MODEL, seed=2, promoted=False)  # not promoted: v1 serves at start
    good = v2.announcement(promoted=True)
    stranger = Keyring.parse("attacker:" + "x" * 40)
    same_id_other_secret = Keyring.parse(f"{KEYRING.signing_key_id}:" + "y" * 40)
    bad = [
        v2.announcement(promoted=True, signed=False),  # unsigned
        stranger.sign(topics.MODELS, v2.announcement(promoted=True, signed=False)),  # a key we do not hold
        same_id_other_secret.sign(topics.MODELS, v2.announcement(promoted=True, signed=False)),  # forged under our key id
        good.model_copy(update={"uri": str(tmp_path / "reg" / MODEL / "1")}),  # a signed event replayed, one field changed
        good.model_copy(update={"metrics": {"mae": 0.1}}),
    ]
    refused = {k: metric("control_refused_total", topic=topics.MODELS, kind=k)
               for k in ("unsigned", "unknown_key", "bad_signature")}
    rt = runtime(redis_url, tmp_path)
    await rt.start(http=False)
    try:
        await poll(serving("1"))
        await add_events(redis_url, bad)
        dead = await letters(redis_url, len(bad))
        assert metric("model_info", model=MODEL, version="2", kind="lstm-close") == 0.0  # nothing swapped
        await add_events(redis_url, [good])  # the same announcement, signed: served
        await poll(serving("2"))
    finally:
        await rt.stop()
    assert [d.source for d in dead] == [topics.MODELS] * len(bad)
    assert all(d.service == "inference" and "\n" not in d.reason for d in dead)
    reasons = [d.reason for d in dead]
    assert reasons[0].startswith("unsigned: ") and reasons[1].startswith("unknown_key: ")
    assert all(r.startswith("bad_signature: ") for r in reasons[2:])
    assert metric("control_refused_total", topic=topics.MODELS, kind="unsigned") == refused["unsigned"] + 1
    assert metric("control_refused_total", topic=topics.MODELS, kind="unknown_key") == refused["unknown_key"] + 1
    assert metric("control_refused_total", topic=topics.MODELS, kind="bad_signature") == refused["bad_signature"] + 3


async def test_an_unsigned_announcement_in_history_is_not_served_at_start(redis_url, tmp_path):
    name = "ctl-history"
    publish(tmp_path / "reg", tmp_path, name, seed=1)
    v2 = publish(tmp_path / "reg", tmp_path, name, seed=2, promoted=False)
    first = runtime(redis_url, tmp_path)
    await first.start(http=False)
    try:
        await add_events(redis_url, [v2.announcement(promoted=True, signed=False)])
        dead = await letters(redis_url, 1)  # met by the running replica's models.v1 reader: dead-lettered
        await poll(serving("1", name))
    finally:
        await first.stop()
    assert dead[0].reason.startswith("unsigned: ")
    # A replica started later reads it in models.v1's history: not served there either. It is not
    # dead-lettered again (models.v1 is read from its end at start, the history only to sync).
    second = runtime(redis_url, tmp_path)
    await second.start(http=False)
    try:
        await poll(serving("1", name))
        assert metric("model_info", model=name, version="2", kind="lstm-close") == 0.0
    finally:
        await second.stop()
    assert len(await read_topic(redis_url, topics.DEAD_LETTERS)) == 1


async def test_without_a_key_every_announcement_is_refused_and_the_start_says_so(redis_url, tmp_path, caplog):
    name = "ctl-nokey"
    v1 = publish(tmp_path / "reg", tmp_path, name, seed=1)
    caplog.set_level(logging.ERROR, logger="klinebus")
    rt = runtime(redis_url, tmp_path, control_keys=None)
    await rt.start(http=False)
    try:
        await poll(serving("1", name))  # the registry is read as before
        await add_events(redis_url, [v1.announcement()])
        (dead,) = await letters(redis_url, 1)
    finally:
        await rt.stop()
    assert dead.reason.startswith("no_control_key: ") and "KLINEBUS_CONTROL_KEYS" in dead.reason
    lines = [r.getMessage() for r in caplog.records if "KLINEBUS_CONTROL_KEYS is not set" in r.getMessage()]
    assert len(lines) == 1 and "models.v1" in lines[0]


async def test_a_signed_announcement_of_a_package_outside_the_sources_or_changed_after_it_is_refused(redis_url, tmp_path):
    name = "ctl-sources"
    publish(tmp_path / "reg", tmp_path, name, seed=1)
    elsewhere = publish(tmp_path / "elsewhere", tmp_path, name, seed=5)  # sound, signed, in the wrong place
    v2 = publish(tmp_path / "reg", tmp_path, name, seed=2, promoted=False)
    events = feature_events(30)
    rt = runtime(redis_url, tmp_path)
    await rt.start(http=False)
    try:
        await poll(serving("1", name))
        meta = json.loads((v2.folder / "klinebus.json").read_text())
        meta["features"] = meta["features"][::-1]  # same graph, other feature order: silently wrong forecasts
        meta["promoted"] = True
        (v2.folder / "klinebus.json").write_text(json.dumps(meta, indent=2))
        await add_events(redis_url, [elsewhere.announcement(version="2"), v2.announcement(promoted=True)])
        dead = await letters(redis_url, 2)
        await add_events(redis_url, events)
        await poll(lambda: count_of(redis_url, name, 30 - FIRST))
        got = [e for e in await read_topic(redis_url, topics.PREDICTIONS) if e["model"] == name]
    finally:
        await rt.stop()
    assert "not under a configured model source" in dead[0].reason
    assert "klinebus.json sha256" in dead[1].reason and dead[1].reason.endswith(f"still serving {name}@1")
    assert {e["model_version"] for e in got} == {"1"}
