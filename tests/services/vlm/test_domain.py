"""The bus-free parts: scoring beside baselines, the answer checks, the Redis waiting room."""

from __future__ import annotations

import asyncio

import pytest

from libs.common.bus import redis_client
from libs.common.settings import SettingsError
from libs.llm.grammar import AnswerError
from services.vlm.analysis import PriceFrame, answer_schema, check_answer
from services.vlm.app import create
from services.vlm.pending import PendingCharts
from services.vlm.scoring import Pending, Scoreboard
from services.vlm.settings import VlmSettings


def pending(signal: str, trend: str, entry: float, prev: float | None = None, open_time: int = 0) -> Pending:
    return Pending("BTCUSDT", "1m", open_time, open_time + 60_000, entry, prev, signal, trend)


def test_scores_beside_hold_last_move_and_majority():
    board = Scoreboard(window=3, flat_bps=5.0)
    # buy after an up candle (100 -> 101), market goes up 1% -> vlm and last_move hit, hold misses
    realised, hits = board.score(pending("buy", "bullish", 101.0, prev=100.0), 102.01)
    assert realised == "up"
    assert hits[("signal", "vlm")] and hits[("trend", "vlm")] and hits[("signal", "last_move")]
    assert not hits[("signal", "hold")] and not hits[("signal", "majority")]  # nothing seen yet: majority says flat
    # sell after a flat candle; market moves 3 bps (flat) -> hold hits, vlm misses, majority (up so far) misses
    realised, hits = board.score(pending("sell", "sideways", 100.0, prev=100.01, open_time=60_000), 100.03)
    assert realised == "flat"
    assert hits[("signal", "hold")] and hits[("trend", "vlm")] and not hits[("signal", "vlm")]
    assert not hits[("signal", "majority")]
    assert board.rate("BTCUSDT", "1m", "signal", "vlm") == 0.5
    assert board.rate("BTCUSDT", "1m", "signal", "hold") == 0.5
    for i in range(3):  # the window keeps the last 3 scores only
        board.score(pending("hold", "sideways", 100.0, open_time=(i + 2) * 60_000), 100.0)
    assert board.rate("BTCUSDT", "1m", "signal", "vlm") == 1.0


FRAME = PriceFrame(low=100.0, high=110.0, first_open=104.0, last_close=105.0, prev_close=104.5, candles=60)


def test_answer_checks_and_level_precision():
    schema = answer_schema(FRAME, 40)
    ok = '{"trend":"bullish","confidence":0.8,"support":[101.5],"resistance":[108.25],"patterns":[" hammer "],"signal":"buy","summary":"up"}'
    a = check_answer(ok, schema)
    assert (a.support, a.resistance, a.patterns) == ([101.5], [108.25], ["hammer"])
    for bad, words in [
        (ok.replace("101.5", "99.0"), "below the minimum"),  # support under the window's low
        (ok.replace("108.25", "104.0"), "below the minimum"),  # resistance under the last close
        (ok.replace('"buy"', '"long"'), "one of"),
    ]:
        with pytest.raises(AnswerError, match=words):
            check_answer(bad, schema)
    assert FRAME.level_decimals() == 1  # a 10-wide range in steps of 0.1
    assert PriceFrame(0.061, 0.0632, 0.062, 0.0625, None, 5).level_decimals() == 5


async def test_latest_chart_wins_and_a_lease_keeps_replicas_apart(redis_url):
    client = redis_client(redis_url)
    try:
        p = PendingCharts(client, "vlm")
        assert await p.offer("BTCUSDT", "1m", 100, b"a") == (True, None)
        assert await p.offer("BTCUSDT", "1m", 200, b"b") == (True, 100)  # superseded
        assert await p.offer("BTCUSDT", "1m", 150, b"c") == (False, 200)  # stale
        assert await p.offer("ETHUSDT", "1m", 50, b"e") == (True, None)
        assert await p.waiting() == [("ETHUSDT|1m", 50), ("BTCUSDT|1m", 200)]
        assert await p.take("BTCUSDT|1m", 200, "replica-a", 60_000) == b"b"
        assert await p.take("BTCUSDT|1m", 200, "replica-b", 60_000) is None  # leased
        assert await p.take("BTCUSDT|1m", 100, "replica-b", 60_000) is None  # not the waiting one
        assert await p.offer("BTCUSDT", "1m", 300, b"d") == (True, 200)  # arrives while 200 is analysed
        assert not await p.done("BTCUSDT|1m", 200)  # the newer chart stays
        assert await p.waiting() == [("ETHUSDT|1m", 50), ("BTCUSDT|1m", 300)]
        assert await p.take("ETHUSDT|1m", 50, "replica-a", 50) == b"e"
        taken = None
        for _ in range(200):  # the lease of a killed replica runs out (50 ms), then another takes it
            taken = await p.take("ETHUSDT|1m", 50, "replica-b", 60_000)
            if taken:
                break
            await asyncio.sleep(0.02)
        assert taken == b"e"
        assert await p.done("ETHUSDT|1m", 50) and await p.count() == 1
    finally:
        await client.aclose()


async def test_a_service_without_a_model_stops_at_start_in_one_line(redis_url, tmp_path):
    runtime = create(VlmSettings(data_dir=tmp_path), redis_url)
    with pytest.raises(SettingsError, match="KLINEBUS_MODEL_PATH"):
        await runtime.start(http=False)
    await runtime.stop()
    with pytest.raises(SettingsError, match="REMOTE_URL"):
        r = create(VlmSettings(data_dir=tmp_path, backend="remote"), redis_url)
        try:
            await r.start(http=False)
        finally:
            await r.stop()


def test_presets_setting_reads_a_comma_list(monkeypatch):
    from libs.common.settings import load_settings

    monkeypatch.setenv("KLINEBUS_PRESETS", "analysis,classifier224")
    assert load_settings(VlmSettings).presets == ["analysis", "classifier224"]
    monkeypatch.delenv("KLINEBUS_PRESETS")
    assert VlmSettings().presets == ["analysis"]


def test_a_close_at_the_window_low_leaves_no_room_for_supports():
    """Last close == the window's low: supports can only be [], and the grammar says so."""
    import json as _json

    from libs.llm.grammar import max_output_chars, schema_to_gbnf

    frame = PriceFrame(low=28292.32, high=28819.71, first_open=28465.0, last_close=28292.32, prev_close=28300.0, candles=60)
    schema = answer_schema(frame)
    grammar = schema_to_gbnf(schema)
    assert 'root-value-support ::= "[]"' in grammar
    ok = _json.dumps({"trend": "bearish", "confidence": 0.4, "support": [], "resistance": [28500], "patterns": [], "signal": "sell", "summary": "at the low"})
    assert check_answer(ok, schema).resistance == [28500.0]
    assert max_output_chars(schema) < max_output_chars(answer_schema(FRAME))


def test_the_majority_baseline_learns_from_the_stored_history():
    from services.vlm.scoring import hit_rates, score

    history = [{"realised": "down", "hits": {}}] * 3 + [{"realised": "up", "hits": {}}]
    record = score(pending("hold", "sideways", 100.0, prev=100.0), 99.0, history, flat_bps=5.0)
    assert record["realised"] == "down"
    assert record["hits"]["signal|majority"] and record["hits"]["signal|hold"] is False
    assert hit_rates([record])[("trend", "majority")] == 1.0
