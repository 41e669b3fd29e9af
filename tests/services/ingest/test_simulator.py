"""The exchange simulator speaks Binance: raw and combined streams, SUBSCRIBE, pings, REST limits."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson

from services.ingest.simulator import ExchangeSimulator, FaultPlan, many_streams
from services.ingest.wsclient import BinanceStreamClient

from ingest_support import shipped_candles


async def test_raw_stream_and_subscribe_replies():
    candles = shipped_candles(3, symbols=("BTCUSDT", "ETHUSDT"))
    async with ExchangeSimulator(candles, speed=600) as sim, aiohttp.ClientSession() as http:
        async with http.ws_connect(sim.ws_url + "/ws/btcusdt@kline_1m") as ws:
            first = orjson.loads((await ws.receive()).data)
            assert first["e"] == "kline" and first["s"] == "BTCUSDT"  # raw payload, no wrapper
            await ws.send_str('{"method":"SUBSCRIBE","params":["ethusdt@kline_1m"],"id":7}')
            seen = set()
            for _ in range(20):
                msg = orjson.loads((await ws.receive()).data)
                seen.add(msg.get("s") or ("reply", msg.get("result"), msg.get("id")))
                if {"ETHUSDT", ("reply", None, 7)} <= seen:
                    break
            assert {"ETHUSDT", ("reply", None, 7)} <= seen


async def test_rest_includes_the_candle_in_progress_and_limits():
    candles = shipped_candles(10, symbols=("BTCUSDT",))
    (ks,) = candles.values()
    faults = FaultPlan(rest_429_at=[2], retry_after_s=1)
    async with ExchangeSimulator(candles, speed=60, faults=faults) as sim, aiohttp.ClientSession() as http:
        q = {"symbol": "BTCUSDT", "interval": "1m", "startTime": ks[0].open_time}
        async with http.get(sim.rest_url + "/api/v3/klines", params=q) as r:
            assert r.status == 200 and r.headers["X-MBX-USED-WEIGHT-1M"] == "2"
            rows = await r.json()
        # at speed 60 the first candle has not closed yet: Binance still returns it, as it stands
        assert [row[0] for row in rows] == [ks[0].open_time]
        assert rows[0][6] == ks[0].close_time and rows[0][6] >= sim.now_ms()
        async with http.get(sim.rest_url + "/api/v3/klines", params=q) as r:
            assert r.status == 429 and r.headers["Retry-After"] == "1"
        async with http.get(sim.rest_url + "/api/v3/ping") as r:
            assert r.status == 418  # asked again inside Retry-After
        await asyncio.sleep(1.05)
        async with http.get(sim.rest_url + "/api/v3/klines", params={**q, "limit": 1001}) as r:
            assert r.status == 400
        async with http.get(sim.rest_url + "/api/v3/time") as r:
            assert abs((await r.json())["serverTime"] - sim.now_ms()) < 5_000


async def test_rest_open_candle_shows_its_values_so_far_and_ingest_drops_it_by_close_time():
    """Mid-candle, REST's newest row is the candle in progress (its latest update, not the final
    candle); ingest's REST client keeps only candles whose close time has passed."""
    from services.ingest.rest import RestKlines

    candles = shipped_candles(6, symbols=("BTCUSDT",))
    (ks,) = candles.values()
    async with ExchangeSimulator(candles, speed=60, updates_per_candle=4) as sim, aiohttp.ClientSession() as http:
        # wait (on the simulated clock) until candle 3 is past its second update but still open
        target = ks[3].open_time + 45_000
        while sim.now_ms() < target:
            await asyncio.sleep(0.02)
        q = {"symbol": "BTCUSDT", "interval": "1m", "startTime": ks[0].open_time}
        async with http.get(sim.rest_url + "/api/v3/klines", params=q) as r:
            rows = await r.json()
        rest = RestKlines(sim.rest_url)
        try:
            closed = await rest.closed_klines("BTCUSDT", "1m", ks[0].open_time)
            recent = await rest.recent_closed_klines("BTCUSDT", "1m", 10)
        finally:
            await rest.close()
    assert [row[0] for row in rows] == [k.open_time for k in ks[:4]]
    open_row = rows[-1]
    assert open_row[6] == ks[3].close_time
    assert float(open_row[5]) < ks[3].volume  # volume so far, not the final candle's
    assert float(open_row[2]) <= ks[3].high and float(open_row[3]) >= ks[3].low
    assert [k.open_time for k in closed] == [k.open_time for k in ks[:3]]
    assert [k.open_time for k in recent] == [k.open_time for k in ks[:3]]
    assert [(k.close, k.volume) for k in closed] == [(k.close, k.volume) for k in ks[:3]]


async def test_control_errors_are_answered_as_binance_does():
    candles = shipped_candles(3, symbols=("BTCUSDT",))
    async with ExchangeSimulator(candles, speed=1) as sim, aiohttp.ClientSession() as http:
        async with http.ws_connect(sim.ws_url + "/ws") as ws:

            async def ask(text: str) -> dict:
                await asyncio.sleep(0.25)  # pacing, not waiting: Binance allows 5 incoming messages/s
                await ws.send_str(text)
                return orjson.loads((await ws.receive(timeout=5)).data)

            assert await ask("{not json") == {"error": {"code": 3, "msg": ANY_MSG}, "id": None}
            reply = await ask('{"method":"SUBSCRIBE","params":["btcusdt@kline_1m"],"id":"x"}')
            assert reply == {"error": {"code": 2, "msg": "Invalid request: request ID must be an unsigned integer"}, "id": None}
            reply = await ask('{"method":"SUBSCRIBEE","params":[],"id":4}')
            assert reply["id"] == 4 and reply["error"]["code"] == 2
            assert reply["error"]["msg"].startswith("Invalid request: unknown variant `SUBSCRIBEE`, expected one of `SUBSCRIBE`")
            assert await ask('{"params":[],"id":5}') == {"error": {"code": 2, "msg": "Invalid request: missing field `method`"}, "id": 5}
            assert await ask('{"method":"GET_PROPERTY","params":["colour"],"id":6}') == {"error": {"code": 0, "msg": "Unknown property"}, "id": 6}
            assert await ask('{"method":"SET_PROPERTY","params":["combined","yes"],"id":7}') == {
                "error": {"code": 1, "msg": "Invalid value type: expected Boolean"}, "id": 7}
            assert await ask('{"method":"SUBSCRIBE","params":["btcusdt@kline_1m"],"id":8}') == {"result": None, "id": 8}
            assert await ask('{"method":"LIST_SUBSCRIPTIONS","id":9}') == {"result": ["btcusdt@kline_1m"], "id": 9}
            # past 1024 streams: the error, then the server closes the connection (1008)
            many = [f"s{i}usdt@kline_1m" for i in range(1024)]
            reply = await ask(orjson.dumps({"method": "SUBSCRIBE", "params": many, "id": 10}).decode())
            assert reply == {"error": {"code": 4, "msg": "Too many subscriptions"}, "id": 10}
            closing = await ws.receive(timeout=5)
            assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 1008
        assert sim.stats.error_replies == 7


class _AnyText(str):
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and other.startswith("Invalid JSON")

    __hash__ = str.__hash__


ANY_MSG = _AnyText("Invalid JSON: ...")


async def test_client_subscribes_beyond_the_url_and_answers_pings():
    candles = shipped_candles(8, symbols=("BTCUSDT", "ETHUSDT", "SOLUSDT"))
    got: set[str] = set()
    connected = []

    async def on_message(text):
        msg = orjson.loads(text)
        if "data" in msg:
            got.add(msg["stream"])

    async with ExchangeSimulator(candles, speed=300, faults=FaultPlan(ping_interval_s=0.2)) as sim:
        client = BinanceStreamClient(
            sim.ws_url, ["btcusdt@kline_1m", "ethusdt@kline_1m", "solusdt@kline_1m"], on_message,
            lambda streams, reason: connected.append((len(streams), reason)), url_streams_max=1,
        )
        task = asyncio.create_task(client.run())
        await asyncio.sleep(1.0)
        task.cancel()
        stats = sim.stats
    assert got == {"btcusdt@kline_1m", "ethusdt@kline_1m", "solusdt@kline_1m"}
    assert stats.subscribe_requests == 1 and connected == [(3, "start")]
    assert stats.pongs_ok >= 2 and stats.pongs_bad == 0


# Binance spot exchangeInfo PRICE_FILTER tickSize of these symbols: 0.01 (two decimals).
TICK_DECIMALS = {"BTCUSDT": 2, "ETHUSDT": 2, "SOLUSDT": 2}


def _text_decimals(text: str) -> int:
    return len(text.split(".")[1].rstrip("0")) if "." in text else 0


def test_in_progress_updates_walk_the_tick_grid_and_widen_to_the_recorded_candle():
    from libs.common.klines import parse_ws_kline
    from services.ingest.simulator.tape import build_tape

    candles = shipped_candles(300)
    recorded = {(k.symbol, k.open_time): k for ks in candles.values() for k in ks}
    updates: dict[tuple[str, int], list[dict]] = {}
    finals: dict[tuple[str, int], dict] = {}
    for e in build_tape(candles, updates_per_candle=6, seed=7):
        payload = e.payload()
        key = (payload["s"], payload["k"]["t"])
        if payload["k"]["x"]:
            finals[key] = payload
        else:
            assert key not in finals, "an update after the candle closed"
            updates.setdefault(key, []).append(payload["k"])
    assert set(finals) == set(recorded) and set(updates) == set(recorded)
    narrower_at_first = 0
    for key, k in recorded.items():
        assert parse_ws_kline(finals[key]) == k  # the final message is exactly the recorded candle
        seq = updates[key]
        assert len(seq) == 6
        for u in seq:
            for field in ("o", "h", "l", "c"):
                assert _text_decimals(u[field]) <= TICK_DECIMALS[k.symbol], (key, field, u[field])
            o, h, low, c = float(u["o"]), float(u["h"]), float(u["l"]), float(u["c"])
            assert o == k.open and k.low <= low <= min(o, c) and max(o, c) <= h <= k.high
            if k.close > k.open and h > k.open:
                assert low == k.low, "a rising candle makes its low before its high"
            if k.close < k.open and low < k.open:
                assert h == k.high, "a falling candle makes its high before its low"
        for a, b in zip(seq, seq[1:]):
            assert float(b["h"]) >= float(a["h"]) and float(b["l"]) <= float(a["l"])  # only widens
            assert float(b["v"]) >= float(a["v"]) and b["n"] >= a["n"]
        assert float(seq[-1]["v"]) <= k.volume
        narrower_at_first += float(seq[0]["h"]) - float(seq[0]["l"]) < k.high - k.low
    assert narrower_at_first > 0.9 * len(recorded)  # the range is not the final one from the start


def test_replay_is_deterministic_per_seed():
    from services.ingest.simulator.tape import build_tape

    candles = shipped_candles(50, symbols=("BTCUSDT",))
    assert build_tape(candles, 3, seed=1) == build_tape(candles, 3, seed=1)
    assert build_tape(candles, 3, seed=1) != build_tape(candles, 3, seed=2)


def test_many_streams_renames_real_candles_so_every_stream_closes_together():
    base = shipped_candles(4)  # BTCUSDT, ETHUSDT, SOLUSDT
    out = many_streams(base, 7)
    assert len(out) == 7 and len({s for s, _ in out}) == 7
    sources = list(base.values())
    for i, ((symbol, interval), ks) in enumerate(out.items()):
        src = sources[i % 3]
        assert symbol.startswith(f"S{i:05d}") and symbol.endswith(src[0].symbol) and symbol.isalnum()
        assert interval == "1m" and all(k.symbol == symbol for k in ks)
        assert [(k.open_time, k.open, k.close, k.volume) for k in ks] == [(k.open_time, k.open, k.close, k.volume) for k in src]
