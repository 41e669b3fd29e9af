"""The inference service on a real Redis with real packages in onnxruntime: every features event
answered by every model serving it, in order, across a hot reload and a restart; a broken package
refused while the old version serves; live scores equal to an offline scoring; mismatches counted;
market alerts."""

from __future__ import annotations

import asyncio

import pytest

from libs.common import topics
from libs.common.contracts import DeadLetter, ScoreEvent
from services.inference import app
from services.inference.settings import InferenceSettings
from services.inference.scoring import direction_hit
from tests.services.inference.models import CONTROL_KEYS, feature_events, publish, window_of
from tests.services.inference.harness import metric, poll, runtime
from tests.streams import add_events, read_topic, wait_for_events

FEATURES = ("close", "sma_20")
FIRST = 21  # skeleton-v1 is warm from candle 19; a window of 3 is full at 21
M15 = 900_000


async def forecasts(url: str, model: str) -> list[dict]:
    return [e for e in await read_topic(url, topics.PREDICTIONS) if e["model"] == model]


async def count_of(url: str, model: str, n: int) -> bool:
    return len(await forecasts(url, model)) >= n


def check(events, got: list[dict], built_for) -> None:
    """Every candle from FIRST on answered once, in order, by the version ``built_for(i)`` names,
    with the value that version's weights give for the window (computed here from the events)."""
    assert [e["open_time"] for e in got] == [ev.open_time for ev in events[FIRST:]]
    for e, i in zip(got, range(FIRST, len(events))):
        built = built_for(i)
        assert e["model_version"] == built.published.version, i
        want = built.expected(window_of(events, i, FEATURES, 3))[0]
        assert e["predicted"]["close"] == pytest.approx(want, rel=1e-6), i
        assert e["target_open_time"] == e["open_time"] + M15 and e["last_close"] == events[i].close
        assert e["close_to_publish_ms"] is not None and e["role"] == "primary"


async def test_every_candle_answered_once_in_order_across_a_hot_reload(redis_url, tmp_path):
    v1 = publish(tmp_path / "reg", tmp_path, "lin-BTCUSDT-15m", seed=1)
    events = feature_events(70)
    rt = runtime(redis_url, tmp_path)
    await rt.start(http=False)
    try:
        await add_events(redis_url, events[:40])
        await poll(lambda: count_of(redis_url, "lin-BTCUSDT-15m", 40 - FIRST))
        v2 = publish(tmp_path / "reg", tmp_path, "lin-BTCUSDT-15m", seed=2)
        await add_events(redis_url, [v2.announcement()])

        async def swapped() -> bool:
            return metric("model_info", model="lin-BTCUSDT-15m", version="2", kind="lstm-close") == 1.0

        await poll(swapped)
        await add_events(redis_url, events[40:])
        await poll(lambda: count_of(redis_url, "lin-BTCUSDT-15m", 70 - FIRST))
        await asyncio.sleep(0.3)  # a doubled forecast would show by now
        got = await forecasts(redis_url, "lin-BTCUSDT-15m")
        persistence = await forecasts(redis_url, "persistence")
    finally:
        await rt.stop()
    check(events, got, lambda i: v1 if i < 40 else v2)
    assert [e["open_time"] for e in persistence] == [ev.open_time for ev in events]
    assert [e["predicted"]["close"] for e in persistence] == [ev.close for ev in events]
    assert await read_topic(redis_url, topics.DEAD_LETTERS) == []


async def test_a_broken_package_is_refused_and_the_old_version_keeps_serving(redis_url, tmp_path):
    v1 = publish(tmp_path / "reg", tmp_path, "m", seed=1)
    events = feature_events(50)
    before = metric("model_load_failures_total", model="m")
    rt = runtime(redis_url, tmp_path)
    await rt.start(http=False)
    try:
        await add_events(redis_url, events[:30])
        v2 = publish(tmp_path / "reg", tmp_path, "m", seed=2)
        (v2.folder / "model.onnx").write_bytes(b"\x08\x07truncated")  # a torn copy on the registry volume
        await add_events(redis_url, [v2.announcement()])
        letters = await wait_for_events(redis_url, topics.DEAD_LETTERS, 1)
        await add_events(redis_url, events[30:])
        await poll(lambda: count_of(redis_url, "m", 50 - FIRST))
        got = await forecasts(redis_url, "m")
    finally:
        await rt.stop()
    (letter,) = [DeadLetter.model_validate(e) for e in letters]
    assert letter.source == topics.MODELS and letter.service == "inference"
    assert letter.reason.startswith("model m@2 refused: ") and "sha256" in letter.reason
    assert letter.reason.endswith("still serving m@1") and "\n" not in letter.reason
    assert metric("model_load_failures_total", model="m") == before + 1
    check(events, got, lambda i: v1)


async def test_after_a_restart_the_windows_come_back_and_nothing_is_lost_or_doubled(redis_url, tmp_path):
    built = publish(tmp_path / "reg", tmp_path, "m", seed=3)
    events = feature_events(60)
    first = runtime(redis_url, tmp_path)
    await first.start(http=False)
    try:
        await add_events(redis_url, events[:35])
        await poll(lambda: count_of(redis_url, "m", 35 - FIRST))
    finally:
        await first.stop()
    await add_events(redis_url, events[35:45])  # arrive while the service is down
    second = runtime(redis_url, tmp_path)
    await second.start(http=False)
    try:
        await add_events(redis_url, events[45:])
        await poll(lambda: count_of(redis_url, "m", 60 - FIRST))
        await asyncio.sleep(0.3)
        got = await forecasts(redis_url, "m")
    finally:
        await second.stop()
    # The first forecast after the restart (candle 35) needs candles 33 and 34 from before it.
    check(events, got, lambda i: built)


async def test_live_scores_equal_an_offline_scoring_of_the_same_events(redis_url, tmp_path):
    publish(tmp_path / "reg", tmp_path, "m", seed=4)
    events = feature_events(80)
    rt = runtime(redis_url, tmp_path, score_window=10, behind_min_samples=5)
    await rt.start(http=False)
    try:
        await add_events(redis_url, events)
        scores = await wait_for_events(redis_url, topics.SCORES, 80 - FIRST - 1)
        preds = await forecasts(redis_url, "m")
    finally:
        await rt.stop()
    close = {ev.open_time: ev.close for ev in events}
    rows = []
    for p in preds:  # offline: each forecast against the close of its target candle
        if p["target_open_time"] in close:
            actual = close[p["target_open_time"]]
            rows.append((p["target_open_time"], abs(p["predicted"]["close"] - actual), abs(p["last_close"] - actual),
                         direction_hit(p["predicted"]["close"], p["last_close"], actual)))
    got = [ScoreEvent.model_validate(s) for s in scores]
    assert [s.open_time for s in got] == [r[0] for r in rows]
    for k, (s, r) in enumerate(zip(got, rows)):
        last = rows[max(0, k - 9): k + 1]
        assert (s.abs_error, s.baseline_abs_error) == pytest.approx(r[1:3]) and s.direction_hit == r[3]
        assert s.rolling_mae == pytest.approx(sum(x[1] for x in last) / len(last))
        assert s.rolling_baseline_mae == pytest.approx(sum(x[2] for x in last) / len(last))
        assert s.behind == (len(last) >= 5 and s.rolling_mae > s.rolling_baseline_mae)
    final = got[-1]
    labels = dict(model="m", symbol="BTCUSDT", interval="15m", horizon="1")
    assert metric("score_mae", **labels) == pytest.approx(final.rolling_mae)
    assert metric("score_mae_ratio", **labels) == pytest.approx(final.mae_ratio)
    assert metric("model_behind_persistence", model="m", symbol="BTCUSDT", interval="15m") == float(final.behind)


async def test_a_features_stream_without_a_models_inputs_is_a_counted_mismatch(redis_url, tmp_path):
    # The model reads bilstm-13-v1's hv_20, which skeleton-v1 events do not carry.
    publish(tmp_path / "reg", tmp_path, "hv", features=("close", "hv_20"), feature_set="bilstm-13-v1")
    before = metric("feature_set_mismatches_total", model="hv", feature_set="skeleton-v1")
    events = feature_events(30)
    rt = runtime(redis_url, tmp_path)
    await rt.start(http=False)
    try:
        await add_events(redis_url, events)
        await poll(lambda: count_of(redis_url, "persistence", 30))
    finally:
        await rt.stop()
    assert await forecasts(redis_url, "hv") == []
    # Counted from the first candle a window would have been full (3 candles), every candle after.
    assert metric("feature_set_mismatches_total", model="hv", feature_set="skeleton-v1") == before + 28


async def test_market_alert_rules_fire_and_resolve_once_per_candle(redis_url, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - {name: rsi-extreme, kind: rsi, above: 60, below: 40, severity: info}\n")
    events = feature_events(120)
    rt = runtime(redis_url, tmp_path, alert_rules=str(rules))
    await rt.start(http=False)
    try:
        await add_events(redis_url, events)
        await poll(lambda: count_of(redis_url, "persistence", 120))
        await asyncio.sleep(0.3)
        alerts = await read_topic(redis_url, topics.ALERTS)
    finally:
        await rt.stop()
    # Offline: the transitions of "RSI outside 40..60", candle by candle.
    want, active = [], False
    for ev in events:
        if "rsi_14" not in ev.values:
            continue
        out = not 40 <= ev.values["rsi_14"] <= 60
        if out != active:
            want.append((ev.open_time, "firing" if out else "resolved"))
            active = out
    assert want and [(a["open_time"], a["status"]) for a in alerts] == want
    assert all(a["rule"] == "rsi-extreme" and a["severity"] == "info" and a["symbol"] == "BTCUSDT" for a in alerts)


def test_a_wrong_rules_file_stops_the_service_with_one_line_per_mistake(tmp_path):
    from libs.common.settings import SettingsError, load_settings

    bad = tmp_path / "rules.yaml"
    bad.write_text("rules:\n  - {name: a, kind: rsi}\n  - {name: b, kind: pattern, features: []}\n")
    with pytest.raises(SettingsError) as err:
        load_settings(InferenceSettings, alert_rules=str(bad))
    text = str(err.value)
    assert "KLINEBUS_ALERT_RULES" in text and "rules[0] (a): needs above, below or both" in text
    assert "rules[1] (b): features must list pattern features" in text and "\n" not in text


async def test_rolling_back_is_announcing_the_older_version_again(redis_url, tmp_path):
    v1 = publish(tmp_path / "reg", tmp_path, "rb", seed=1)
    v2 = publish(tmp_path / "reg", tmp_path, "rb", seed=2)  # the registry's newest: served at start
    events = feature_events(40)
    rt = runtime(redis_url, tmp_path)
    await rt.start(http=False)
    try:
        await add_events(redis_url, events[:30])
        await poll(lambda: count_of(redis_url, "rb", 30 - FIRST))
        # A package of another kind (image + text inputs) is not this service's to serve: no dead letter.
        from libs.common import model_package as mp

        multi = v1.meta.model_copy(update={"name": "chart-cls", "inputs": [
            mp.TensorSpec(name="image", dtype="int64", shape=["batch", 3]), mp.TensorSpec(name="ids", dtype="int64", shape=["batch", 3])]})
        import onnx
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            [helper.make_node("Add", ["image", "ids"], ["prices"])], "two-inputs",
            [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", 3]) for n in ("image", "ids")],
            [helper.make_tensor_value_info("prices", TensorProto.INT64, ["batch", 3])])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "two.onnx")
        folder = tmp_path / "reg" / "chart-cls" / "1"  # under the registry root: a source inference loads from
        mp.write_package(folder, multi, tmp_path / "two.onnx", card="card")
        other = v1.announcement(model="chart-cls", version="1", uri=str(folder), sha256=mp.package_digest(folder))
        await add_events(redis_url, [other, v1.announcement()])

        async def rolled_back() -> bool:
            return (metric("model_info", model="rb", version="1", kind="lstm-close") == 1.0
                    and metric("model_info", model="rb", version="2", kind="lstm-close") == 0.0)

        await poll(rolled_back)
        await add_events(redis_url, events[30:])
        await poll(lambda: count_of(redis_url, "rb", 40 - FIRST))
        got = await forecasts(redis_url, "rb")
    finally:
        await rt.stop()
    check(events, got, lambda i: v2 if i < 30 else v1)
    assert await read_topic(redis_url, topics.DEAD_LETTERS) == []


async def test_a_standby_replica_takes_over_with_current_windows(redis_url, tmp_path):
    """Two replicas: the second waits as a hot standby while the first answers; when the first
    stops, the standby rebuilds its windows (its own are empty) and carries on without a gap."""
    built = publish(tmp_path / "reg", tmp_path, "sb", seed=6)
    events = feature_events(60)
    owner = runtime(redis_url, tmp_path)
    await owner.start(http=False)
    standby = app.create(InferenceSettings(data_dir=tmp_path / "b", redis_url=redis_url, consumer_name="standby",
                                           model_dir=str(tmp_path / "reg"), max_wait_ms=1,
                                           control_keys=CONTROL_KEYS), redis_url)
    try:
        await standby.start(http=False)
        await add_events(redis_url, events[:40])
        await poll(lambda: count_of(redis_url, "sb", 40 - FIRST))
        await owner.stop()
        await add_events(redis_url, events[40:])
        await poll(lambda: count_of(redis_url, "sb", 60 - FIRST))
        await asyncio.sleep(0.3)
        got = await forecasts(redis_url, "sb")
    finally:
        await standby.stop()
    check(events, got, lambda i: built)


async def test_a_model_announced_while_a_standby_starts_is_served_by_it(redis_url, tmp_path):
    """A replica that owns no partition reads models.v1 only at start-up and then through its
    broadcast: an announcement made between the two (while it loaded its models) is served too,
    not left until it happens to take a partition over."""
    v1 = publish(tmp_path / "reg", tmp_path, "gap", seed=1)
    owner = runtime(redis_url, tmp_path)
    await owner.start(http=False)
    standby = app.create(InferenceSettings(data_dir=tmp_path / "b", redis_url=redis_url, consumer_name="standby",
                                           model_dir=str(tmp_path / "reg"), max_wait_ms=1,
                                           control_keys=CONTROL_KEYS), redis_url)

    @standby.on_startup
    async def announce_during_start_up() -> None:  # runs after the service loaded its models, before the bus
        v2 = publish(tmp_path / "reg", tmp_path, "gap", seed=2)
        await add_events(redis_url, [v2.announcement()])

    def serving(rt) -> str | None:
        served = rt.inference.engine.router.get("gap")
        return served.spec.version if served is not None else None

    try:
        await standby.start(http=False)
        assert serving(standby) in (v1.published.version, "2")
        assert not standby.inference.owned  # the owner holds the partition: no take-over re-reads models.v1

        async def both_on_v2() -> bool:
            return serving(standby) == "2" and serving(owner) == "2"

        await poll(both_on_v2, timeout=30.0)
    finally:
        await standby.stop()
        await owner.stop()


@pytest.mark.parametrize("calls, threads, warned", [(2, 1, False), (2, 2, True), (4, 1, True)])
async def test_one_line_at_start_when_session_calls_want_more_cores_than_the_pod_has(
        redis_url, tmp_path, monkeypatch, caplog, calls, threads, warned):
    monkeypatch.setattr(app, "available_cpus", lambda: 2.0)  # a pod with a 2-CPU limit
    rt = runtime(redis_url, tmp_path, session_calls=calls, session_threads=threads)
    with caplog.at_level("WARNING", logger="klinebus.inference"):
        await rt.start(http=False)
        await rt.stop()
    lines = [r.getMessage() for r in caplog.records if "KLINEBUS_SESSION_CALLS" in r.getMessage()]
    if warned:
        assert len(lines) == 1 and f"wants {calls * threads} cores" in lines[0] and "may use 2.0" in lines[0]
    else:
        assert lines == []

