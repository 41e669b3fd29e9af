"""charts.v1 -> analyses.v1 on a real Redis through the real llama-cpp path (the tiny
Qwen2.5-VL pair, in process and behind llama-cpp-python's own server), with dead letters,
latest-wins skips, a restart that loses nothing, and scoring beside the baselines."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from prometheus_client import REGISTRY

from libs.common import topics
from libs.llm.testing import ModelServer, free_port
from services.vlm.analysis import PROMPT_VERSION
from services.vlm.app import create
from services.vlm.settings import VlmSettings
from tests.streams import add_events, read_topic, wait_for_events

from .conftest import ScriptedServer, chart_event, chart_png, kline_events


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(f"klinebus_vlm_{name}", labels) or 0.0


def local_settings(tmp_path, pair, **kw) -> VlmSettings:
    base = dict(
        data_dir=tmp_path, model_path=str(pair.model), mmproj_path=str(pair.mmproj), n_ctx=2048, n_threads=1,
        image_max_tokens=64, image_max_side=224, warmup=False, call_timeout_s=60, score_poll_s=0.1, model_retry_s=0.3,
    )
    return VlmSettings(**{**base, **kw})


async def wait_until(cond, timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def test_local_backend_analyses_scores_and_dead_letters(redis_url, tmp_path, tiny_pair, candles):
    png = chart_png(tmp_path / "charts" / "btc.png", candles[:60])
    # the window's candles and the one after it (the scored candle, horizon 1)
    await add_events(redis_url, kline_events(candles[:61]))
    sol = [dataclasses.replace(k, symbol="SOLUSDT") for k in candles[:60]]
    await add_events(redis_url, kline_events(sol))
    charts = [chart_event(candles, last, f"file://{png}") for last in (57, 58, 59)]
    bad = [
        chart_event(candles, 59, f"file://{png}", symbol="ETHUSDT"),  # no ETHUSDT candles on klines.v1
        chart_event(sol, 59, f"file://{tmp_path / 'charts' / 'gone.png'}", symbol="SOLUSDT"),  # its image is missing
    ]
    thumbnail = chart_event(candles, 59, f"file://{png}").model_copy(update={"preset": "classifier224"})
    preset_skips = metric("skipped_total", why="preset")
    skipped_before = metric("skipped_total", why="superseded") + metric("skipped_total", why="stale")
    scored_before = metric("scored_total", symbol="BTCUSDT", interval="15m", call="signal", predictor="hold", result="hit") + metric(
        "scored_total", symbol="BTCUSDT", interval="15m", call="signal", predictor="hold", result="miss"
    )
    runtime = create(local_settings(tmp_path, tiny_pair), redis_url)
    await runtime.start(http=False)
    try:
        await add_events(redis_url, [thumbnail] + charts + bad)
        dead = await wait_for_events(redis_url, topics.DEAD_LETTERS, 2, settle=0)
        await wait_until(lambda: metric("analyses_total", result="published") >= 1)
        analyses = await _settled(redis_url, candles[59].open_time)
        await wait_until(
            lambda: metric("scored_total", symbol="BTCUSDT", interval="15m", call="signal", predictor="hold", result="hit")
            + metric("scored_total", symbol="BTCUSDT", interval="15m", call="signal", predictor="hold", result="miss")
            > scored_before
        )
    finally:
        await runtime.stop()
    skipped = metric("skipped_total", why="superseded") + metric("skipped_total", why="stale") - skipped_before
    assert len(analyses) + skipped == len(charts)
    assert metric("skipped_total", why="preset") == preset_skips + 1  # not a chart for the VLM
    assert [a["open_time"] for a in analyses] == sorted({a["open_time"] for a in analyses})  # once each, in order
    last = analyses[-1]
    shown = candles[:60]
    low, high, close = min(k.low for k in shown), max(k.high for k in shown), shown[-1].close
    assert last["open_time"] == candles[59].open_time and last["symbol"] == "BTCUSDT"
    assert last["model"] == tiny_pair.model.name and last["model_revision"] == "local" and last["backend"] == "local"
    assert last["prompt_version"] == PROMPT_VERSION and last["attempts"] == 1
    assert last["trend"] in ("bullish", "bearish", "sideways") and last["signal"] in ("buy", "sell", "hold")
    assert 0 <= last["confidence"] <= 1
    assert all(low <= v <= close for v in last["support"]) and all(close <= v <= high for v in last["resistance"])
    assert (last["price_low"], last["price_high"], last["last_close"]) == (low, high, close)
    assert {"image_prep", "image_encode", "prompt", "generation", "total"} <= set(last["timings_ms"])
    assert last["timings_ms"]["image_encode"] > 0
    reasons = sorted(d["reason"] for d in dead)
    assert any("ETHUSDT 15m" in r and "not on klines.v1" in r for r in reasons), reasons
    assert any("unusable_chart" in r and "gone.png" in r for r in reasons), reasons
    # the scored call: hold hits when the next candle moved less than 5 bps
    moved_bps = abs(candles[60].close / candles[59].close - 1) * 10_000
    assert metric("hit_rate", symbol="BTCUSDT", interval="15m", call="signal", predictor="hold") == (1.0 if moved_bps <= 5 else 0.0)


async def _settled(url: str, last_open_time: int) -> list[dict]:
    for _ in range(600):
        got = await read_topic(url, topics.ANALYSES)
        if got and got[-1]["open_time"] == last_open_time:
            return got
        await asyncio.sleep(0.1)
    raise AssertionError("the latest chart was not analysed")


async def test_remote_backend_down_then_up_across_a_restart_loses_and_doubles_nothing(redis_url, tmp_path, tiny_pair, candles):
    pytest.importorskip("uvicorn", reason="the vlm-server extra (llama-cpp-python's server) is not installed")
    png = chart_png(tmp_path / "charts" / "btc.png", candles[:60])
    await add_events(redis_url, kline_events(candles[:60]))
    port = free_port()
    settings = VlmSettings(
        data_dir=tmp_path, backend="remote", remote_url=f"http://127.0.0.1:{port}", image_max_side=224,
        call_timeout_s=60, model_retry_s=0.2, score_poll_s=0.2,
    )
    errors_before = metric("backend_errors_total")
    first = create(settings, redis_url)
    await first.start(http=False)
    try:
        await add_events(redis_url, [chart_event(candles, 59, f"file://{png}")])
        await wait_until(lambda: metric("backend_errors_total") >= errors_before + 2)  # the server is down: it waits
        await wait_until(lambda: metric("pending_charts") == 1)  # and the chart waits with it
        await wait_until(lambda: first.health.status()[1].get("model") is False)
    finally:
        await first.stop()
    assert await read_topic(redis_url, topics.ANALYSES) == []
    with ModelServer(tiny_pair, port=port):
        second = create(settings, redis_url)
        await second.start(http=False)
        try:
            analyses = await wait_for_events(redis_url, topics.ANALYSES, 1, settle=1.0)
        finally:
            await second.stop()
    assert len(analyses) == 1
    a = analyses[0]
    assert a["open_time"] == candles[59].open_time and a["backend"] == "remote" and a["model"] == tiny_pair.model.name
    assert await read_topic(redis_url, topics.DEAD_LETTERS) == []


@pytest.mark.parametrize("garbage_then", ["garbage", "valid"])
async def test_a_refused_answer_is_retried_once_with_the_reason_then_dead_lettered(redis_url, tmp_path, candles, garbage_then):
    """A server that ignores the grammar (an OpenAI-compatible one, over a real socket)."""
    shown = candles[:60]
    valid = (
        '{"trend":"bullish","confidence":0.7,"support":[%s],"resistance":[%s],"patterns":["hammer"],'
        '"signal":"buy","summary":"ok"}' % (min(k.low for k in shown), max(k.high for k in shown))
    )
    answers = ["Sure! The chart looks bullish.", "garbage again" if garbage_then == "garbage" else valid]

    async def reply(n: int, _body: dict) -> str:
        return answers[min(n - 1, 1)]

    png = chart_png(tmp_path / "charts" / "btc.png", shown)
    await add_events(redis_url, kline_events(shown))
    async with ScriptedServer(reply) as server:
        runtime = create(VlmSettings(data_dir=tmp_path, backend="remote", remote_url=server.url), redis_url)
        await runtime.start(http=False)
        try:
            await add_events(redis_url, [chart_event(candles, 59, f"file://{png}")])
            topic = topics.DEAD_LETTERS if garbage_then == "garbage" else topics.ANALYSES
            got = await wait_for_events(redis_url, topic, 1, settle=0.3)
        finally:
            await runtime.stop()
    requests = server.requests
    assert len(requests) == 2
    assert "grammar" in requests[0] and requests[0]["max_tokens"] > 0
    retry = requests[1]["messages"][-1]["content"]
    assert "refused" in retry and "not valid JSON" in retry
    assert requests[1]["messages"][-2] == {"role": "assistant", "content": answers[0]}
    if garbage_then == "garbage":
        assert len(got) == 1 and "vlm refused: no valid answer in 2 attempts" in got[0]["reason"]
        assert got[0]["source"] == topics.CHARTS
    else:
        assert len(got) == 1 and got[0]["attempts"] == 2 and got[0]["model"] == "scripted.gguf"


async def test_a_model_timeout_is_a_dead_letter_and_the_service_keeps_serving(redis_url, tmp_path, candles):
    """A server slower than the call deadline (real HTTP on loopback): the chart is dead-lettered
    with the reason, and the next chart is still analysed."""
    shown = candles[:60]
    valid = '{"trend":"sideways","confidence":0.5,"support":[],"resistance":[],"patterns":[],"signal":"hold","summary":"flat"}'

    async def reply(n: int, _body: dict) -> str:
        if n == 1:
            await asyncio.sleep(3)  # far past the 0.5 s deadline
        return valid

    png = chart_png(tmp_path / "charts" / "btc.png", shown)
    sol = [dataclasses.replace(k, symbol="SOLUSDT") for k in shown]
    await add_events(redis_url, kline_events(shown) + kline_events(sol))
    async with ScriptedServer(reply) as server:
        settings = VlmSettings(data_dir=tmp_path, backend="remote", remote_url=server.url, call_timeout_s=0.5)
        runtime = create(settings, redis_url)
        await runtime.start(http=False)
        try:
            await add_events(redis_url, [chart_event(candles, 59, f"file://{png}")])
            dead = await wait_for_events(redis_url, topics.DEAD_LETTERS, 1, settle=0)
            await add_events(redis_url, [chart_event(sol, 59, f"file://{png}", symbol="SOLUSDT")])
            analyses = await wait_for_events(redis_url, topics.ANALYSES, 1, settle=0.3)
        finally:
            await runtime.stop()
    assert "vlm timeout: model server took longer than 0.5s" in dead[0]["reason"]
    assert len(analyses) == 1 and analyses[0]["symbol"] == "SOLUSDT" and analyses[0]["signal"] == "hold"


async def test_a_failing_model_server_is_retried_then_dead_lettered(redis_url, tmp_path, candles):
    """HTTP 503 from the server: the chart waits and is tried again, then dead-lettered after
    KLINEBUS_BACKEND_ATTEMPTS tries; readiness says the model is not there meanwhile."""
    from aiohttp import web

    async def reply(n: int, _body: dict) -> str:
        raise web.HTTPServiceUnavailable(text="model is loading")

    shown = candles[:60]
    png = chart_png(tmp_path / "charts" / "btc.png", shown)
    await add_events(redis_url, kline_events(shown))
    async with ScriptedServer(reply) as server:
        settings = VlmSettings(data_dir=tmp_path, backend="remote", remote_url=server.url, backend_attempts=2, model_retry_s=0.1)
        runtime = create(settings, redis_url)
        await runtime.start(http=False)
        try:
            await add_events(redis_url, [chart_event(candles, 59, f"file://{png}")])
            dead = await wait_for_events(redis_url, topics.DEAD_LETTERS, 1, settle=0.3)
            ready = runtime.health.status()[1]["model"]
        finally:
            await runtime.stop()
    assert len(server.requests) == 2 and len(dead) == 1
    assert "vlm backend_down: model server answered HTTP 503: model is loading" in dead[0]["reason"]
    assert ready is False
    assert await read_topic(redis_url, topics.ANALYSES) == []


async def test_charts_outside_the_artefact_root_or_not_png_are_dead_letters_never_read(redis_url, tmp_path, candles):
    """Chart uris are input: only PNGs under the artefact root (<data_dir>/charts here), at most
    max_chart_bytes, reach the model; every other uri is a dead letter with the reason, counted,
    and the service goes on to analyse the next good chart."""
    valid = '{"trend":"sideways","confidence":0.5,"support":[],"resistance":[],"patterns":[],"signal":"hold","summary":"flat"}'

    async def reply(n: int, _body: dict) -> str:
        return valid

    shown = candles[:60]
    root = tmp_path / "charts"
    png = chart_png(root / "btc.png", shown)
    (root / "notes.png").write_text("SECRET=hunter2\n")  # under the root, named .png, not a PNG
    big = root / "big.png"
    big.write_bytes(png.read_bytes() + b"\0" * 4096)  # a PNG larger than the cap below
    outside = chart_png(tmp_path / "elsewhere" / "btc.png", shown)  # a real PNG, outside the root
    bad_uris = {
        "AAAUSDT": "file:///proc/self/environ",
        "BBBUSDT": "file:///dev/zero",
        "CCCUSDT": f"file://{root / 'notes.png'}",
        "DDDUSDT": f"file://{big}",
        "EEEUSDT": f"file://{outside}",
        "FFFUSDT": "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "GGGUSDT": f"file://{root}/../elsewhere/btc.png",
    }
    series = {s: [dataclasses.replace(k, symbol=s) for k in shown] for s in bad_uris}
    await add_events(redis_url, kline_events(shown) + [e for s in series.values() for e in kline_events(s)])
    before = {k: metric("artefact_reads_refused_total", kind=k) for k in ("outside_root", "not_png", "too_large")}
    async with ScriptedServer(reply) as server:
        settings = VlmSettings(data_dir=tmp_path, backend="remote", remote_url=server.url,
                               max_chart_bytes=len(png.read_bytes()) + 100)
        runtime = create(settings, redis_url)
        await runtime.start(http=False)
        try:
            await add_events(redis_url, [chart_event(series[s], 59, uri, symbol=s) for s, uri in bad_uris.items()])
            dead = await wait_for_events(redis_url, topics.DEAD_LETTERS, len(bad_uris), settle=0)
            await add_events(redis_url, [chart_event(candles, 59, f"file://{png}")])
            analyses = await wait_for_events(redis_url, topics.ANALYSES, 1, settle=0.3)
        finally:
            await runtime.stop()
    assert len(server.requests) == 1  # only the good chart reached the model
    assert len(analyses) == 1 and analyses[0]["symbol"] == "BTCUSDT"
    by_symbol = {d["payload"].split('"symbol":"')[1][:7]: d["reason"] for d in dead}
    assert set(by_symbol) == set(bad_uris)
    assert all(r.startswith("vlm unusable_chart: ") and "\n" not in r for r in by_symbol.values())
    for s in ("AAAUSDT", "BBBUSDT", "EEEUSDT", "FFFUSDT", "GGGUSDT"):
        assert "not under the artefact root" in by_symbol[s], by_symbol[s]
    assert "is not a PNG" in by_symbol["CCCUSDT"] and "hunter2" not in str(dead)
    assert "larger than" in by_symbol["DDDUSDT"]
    assert metric("artefact_reads_refused_total", kind="outside_root") == before["outside_root"] + 5
    assert metric("artefact_reads_refused_total", kind="not_png") == before["not_png"] + 1
    assert metric("artefact_reads_refused_total", kind="too_large") == before["too_large"] + 1
