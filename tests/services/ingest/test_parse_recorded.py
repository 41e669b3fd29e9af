"""The parser and the ingest engine against real recorded Binance messages (tests/fixtures/binance)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from libs.common.klines import InvalidKline, kline_from_row, parse_ws_kline
from services.ingest.engine import IngestEngine
from services.ingest.metrics import IngestMetrics
from libs.common.telemetry import ServiceMetrics

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "binance"


def lines(name: str) -> list[bytes]:
    return [ln for ln in (FIXTURES / name).read_bytes().splitlines() if ln.strip()]


def test_final_message_of_recorded_5m_candle():
    msgs = lines("ws_raw_btcusdt_5m_20210621.jsonl")
    k = parse_ws_kline(msgs[1])  # values read by hand from the recording
    assert (k.symbol, k.interval, k.open_time, k.close_time) == ("BTCUSDT", "5m", 1624297800000, 1624298099999)
    assert (k.open, k.high, k.low, k.close) == (32208.66, 32285.42, 32162.66, 32206.08)
    assert k.volume == pytest.approx(335.174139) and k.quote_volume == pytest.approx(10793596.96728088)
    assert k.trades == 5584 and k.taker_buy_base == pytest.approx(161.434178)
    assert k.closed is True
    assert [parse_ws_kline(m).closed for m in msgs] == [False, True, False, False, False, False, False, False]


def test_recorded_updates_of_other_sources_parse():
    day = [parse_ws_kline(m) for m in lines("ws_raw_btcusdt_1d_20210319.jsonl")]
    assert {(k.interval, k.open_time, k.close_time) for k in day} == {("1d", 1616112000000, 1616198399999)}
    assert [k.close for k in day] == [58402.74, 58402.74, 58402.75]
    one = parse_ws_kline((FIXTURES / "ws_raw_btcusdt_5m_20210914.json").read_bytes())
    assert (one.open_time, one.trades, one.low) == (1631636700000, 582, 46668.45)
    combined = parse_ws_kline((FIXTURES / "ws_combined_slfusdt_1m_futures_20250426.json").read_bytes())
    assert (combined.symbol, combined.interval, combined.close, combined.volume) == ("SLFUSDT", "1m", 0.2081, 624.6)


def test_documented_rest_row():
    (row,) = orjson.loads((FIXTURES / "rest_klines_docs_example.json").read_bytes())
    k = kline_from_row(row, "BNBBTC", "1w")
    assert (k.open_time, k.close_time, k.open, k.high, k.trades) == (1499040000000, 1499644799999, 0.0163479, 0.8, 308)


@pytest.mark.parametrize(
    "raw, why",
    [
        (b'{"stream":"btcusdt@kline_1m","data":{"e":"kline","k":{"t":', "malformed JSON"),
        (b"[1,2,3]", "expected a JSON object"),
        (b'{"e":"trade","E":1}', "not a kline"),
        (b'{"e":"kline","E":1,"s":"BTCUSDT","k":{"t":0,"T":59999,"s":"BTCUSDT","i":"1m"}}', "lacks field"),
    ],
)
def test_malformed_messages_are_refused_with_a_reason(raw, why):
    with pytest.raises(InvalidKline) as err:
        parse_ws_kline(raw)
    assert why in err.value.reason


class _FakeSink:
    def __init__(self):
        self.published: list = []
        self.last: dict = {}

    async def last_open_times(self):
        return dict(self.last)

    async def publish_closed(self, ks, source):
        out = []
        for k in ks:
            key = (k.symbol, k.interval)
            if self.last.get(key, -1) >= k.open_time:
                out.append((False, self.last[key]))
                continue
            self.last[key] = k.open_time
            self.published.append((k, source))
            out.append((True, k.open_time))
        return out

    async def publish_live(self, k):
        self.published.append((k, "live"))


async def test_engine_publishes_only_the_recorded_final_message():
    import asyncio

    sink, dead = _FakeSink(), []

    async def dead_letter(source, raw, reason):
        dead.append(reason)

    engine = IngestEngine(["BTCUSDT"], ["5m"], sink, rest=None, metrics=IngestMetrics(ServiceMetrics("ingest")), dead_letter=dead_letter)  # type: ignore[arg-type]
    await engine.load()
    runner = asyncio.create_task(engine.run_trackers())
    for m in lines("ws_raw_btcusdt_5m_20210621.jsonl") + [lines("ws_raw_btcusdt_5m_20210621.jsonl")[1]]:
        await engine.on_message(m)
    await asyncio.sleep(0.05)
    runner.cancel()
    assert [(k.open_time, k.close, src) for k, src in sink.published] == [(1624297800000, 32206.08, "ws")]
    assert dead == []
