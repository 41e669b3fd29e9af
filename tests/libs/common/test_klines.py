import gzip
import zipfile
from pathlib import Path

import orjson
import pytest

from libs.common.klines import (
    InvalidKline,
    Kline,
    interval_ms,
    kline_to_rest_row,
    kline_to_ws_payload,
    parse_ws_kline,
    read_kline_csv,
    read_kline_frame,
)

DATA = Path(__file__).resolve().parents[2] / "data" / "klines"
FUTURES = DATA / "AVAXUSDT-1m-2026-04-01-futures-um-head60.csv.gz"


def _lines() -> list[str]:
    return gzip.decompress(FUTURES.read_bytes()).decode().splitlines()


def test_full_12_column_binance_csv_reads_every_field():
    klines = read_kline_csv(FUTURES)
    assert len(klines) == 60
    first = klines[0]
    # Values straight from the first data row of the real file.
    assert first == Kline(
        symbol="AVAXUSDT", interval="1m", open_time=1775001600000, close_time=1775001659999,
        open=8.907, high=8.929, low=8.906, close=8.909, volume=31739.0, quote_volume=283106.377,
        trades=797, taker_buy_base=18341.0, taker_buy_quote=163597.26, closed=True,
    )
    assert all(b.open_time - a.open_time == interval_ms("1m") for a, b in zip(klines, klines[1:]))


def test_headerless_and_microsecond_files_read_the_same(tmp_path):
    header, *rows = _lines()
    # data.binance.vision: no header before 2022, microseconds in spot files since 2025.
    micro_rows = []
    for row in rows:
        f = row.split(",")
        f[0], f[6] = str(int(f[0]) * 1000), str(int(f[6]) * 1000 + 999)
        micro_rows.append(",".join(f))
    path = tmp_path / "AVAXUSDT-1m-2026-04-01.csv"
    path.write_text("\n".join(micro_rows) + "\n")
    assert read_kline_csv(path) == read_kline_csv(FUTURES)


def test_zip_archive_as_published(tmp_path):
    path = tmp_path / "AVAXUSDT-1m-2026-04.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("AVAXUSDT-1m-2026-04.csv", "\n".join(_lines()[1:]))
    assert read_kline_csv(path) == read_kline_csv(FUTURES)


@pytest.mark.parametrize(
    "row, reason",
    [
        ("1,10,9,11,10,5,60000", "high 9.0 < low 11.0"),
        ("1,10,12,9,10,-5,60000", "volume must be finite and >= 0"),
        ("60000,10,12,9,10,5,60000", "close_time 60000 <= open_time 60000"),
        ("1,0,12,9,10,5,60000", "open must be a positive finite price"),
        ("1,10,12,9,nan,5,60000", "close must be a positive finite price"),
        ("1,13,12,9,10,5,60000", "open/close outside [low, high]"),
        ("1,10,12,9", "has 4 fields"),
    ],
)
def test_impossible_candles_are_rejected_with_the_reason(tmp_path, row, reason):
    path = tmp_path / "BTCUSDT-1m-x.csv"
    path.write_text(row + "\n")
    with pytest.raises(InvalidKline) as err:
        read_kline_csv(path)
    assert reason in err.value.reason
    assert f"{path}:1:" in err.value.reason  # says where


def test_file_name_must_tell_symbol_and_interval(tmp_path):
    path = tmp_path / "candles.csv"
    path.write_text("1,10,12,9,10,5,60000\n")
    with pytest.raises(InvalidKline, match="cannot tell symbol and interval"):
        read_kline_csv(path)
    assert read_kline_csv(path, "BTCUSDT", "1m")[0].close == 10.0


# A combined-stream kline message in Binance's documented shape
# (Binance Spot API docs, "WebSocket Streams" > "Kline/Candlestick Streams" payload example).
DOC_PAYLOAD = {
    "e": "kline", "E": 1672515782136, "s": "BNBBTC",
    "k": {
        "t": 1672515780000, "T": 1672515839999, "s": "BNBBTC", "i": "1m", "f": 100, "L": 200,
        "o": "0.0010", "c": "0.0020", "h": "0.0025", "l": "0.0015", "v": "1000", "n": 100,
        "x": False, "q": "1.0000", "V": "500", "Q": "0.500", "B": "123456",
    },
}


def test_websocket_payload_raw_and_combined():
    # The docs' example has l=0.0015 > o=0.0010, which no real candle can have: we refuse it.
    with pytest.raises(InvalidKline, match="outside"):
        parse_ws_kline(DOC_PAYLOAD)
    fixed = orjson.loads(orjson.dumps(DOC_PAYLOAD))
    fixed["k"]["l"] = "0.0005"
    raw = parse_ws_kline(fixed)
    combined = parse_ws_kline(orjson.dumps({"stream": "bnbbtc@kline_1m", "data": fixed}))
    assert raw == combined
    assert (raw.symbol, raw.interval, raw.open_time, raw.closed) == ("BNBBTC", "1m", 1672515780000, False)
    assert (raw.low, raw.high, raw.trades, raw.taker_buy_quote) == (0.0005, 0.0025, 100, 0.5)


@pytest.mark.parametrize(
    "message, reason",
    [
        (b"{not json", "malformed JSON"),
        (b"[1,2]", "expected a JSON object"),
        (b'{"e":"trade"}', "not a kline event"),
        (b'{"e":"kline","k":{"s":"BTCUSDT"}}', "lacks field"),
    ],
)
def test_malformed_websocket_messages(message, reason):
    with pytest.raises(InvalidKline, match=reason):
        parse_ws_kline(message)


def test_payload_builders_round_trip_through_the_parsers():
    k = read_kline_csv(FUTURES)[5]
    assert parse_ws_kline(kline_to_ws_payload(k)) == k
    from libs.common.klines import kline_from_row

    assert kline_from_row(kline_to_rest_row(k), k.symbol, k.interval) == k


def test_frame_reader_sorts_and_types(tmp_path):
    frame = read_kline_frame(FUTURES)
    assert list(frame.columns[:4]) == ["symbol", "interval", "open_time", "close_time"]
    assert frame["open_time"].is_monotonic_increasing
    assert str(frame["open_time"].dtype) == "int64"
    pq = tmp_path / "k.parquet"
    frame.iloc[::-1].to_parquet(pq)
    assert read_kline_frame(pq)["open_time"].tolist() == frame["open_time"].tolist()


def test_a_candle_must_span_its_interval(tmp_path):
    path = tmp_path / "BTCUSDT-1m-x.csv"
    path.write_text("0,10,12,9,10,5,1\n")  # a "1m" candle 2 ms long
    with pytest.raises(InvalidKline, match="close_time - open_time is 1 ms, a 1m candle spans 59999"):
        read_kline_csv(path)


def test_off_grid_open_times_are_real_and_accepted(tmp_path):
    # Binance served 1h candles opening off the hour after the 2018-02-08 outage (shared data README).
    path = tmp_path / "ETHUSDT-1h-x.csv"
    path.write_text("1518168494800,10,12,9,10,5,1518172094799\n")
    assert read_kline_csv(path)[0].open_time == 1518168494800


def test_a_candle_from_the_future_is_refused():
    import time as _time

    future = (_time.time_ns() // 1_000_000 // 60_000 + 60) * 60_000  # an hour ahead
    fixed = orjson.loads(orjson.dumps(DOC_PAYLOAD))
    fixed["k"].update({"t": future, "T": future + 59_999, "s": "BNBBTC", "l": "0.0005"})
    with pytest.raises(InvalidKline, match="in the future"):
        parse_ws_kline(fixed)


def test_a_combined_stream_must_carry_its_own_symbol_and_interval():
    fixed = orjson.loads(orjson.dumps(DOC_PAYLOAD))
    fixed["k"]["l"] = "0.0005"
    with pytest.raises(InvalidKline, match="stream 'btcusdt@kline_1m' carries a BNBBTC 1m kline"):
        parse_ws_kline({"stream": "btcusdt@kline_1m", "data": fixed})


def _breaks_a_rule(k: Kline, now: int) -> bool:
    """The candle rules spelled one by one, independently of validate_kline's fast path."""
    import math

    prices = (k.open, k.high, k.low, k.close)
    amounts = (k.volume, k.quote_volume, k.taker_buy_base, k.taker_buy_quote)
    span = {"1m": 60_000, "1h": 3_600_000}.get(k.interval)
    return (
        span is None
        or not k.symbol or not k.symbol.isalnum() or k.symbol != k.symbol.upper()
        or any(not math.isfinite(p) or p <= 0 for p in prices)
        or any(not math.isfinite(a) or a < 0 for a in amounts)
        or k.trades < 0
        or k.high < max(k.open, k.close, k.low)
        or k.low > min(k.open, k.close)
        or k.open_time < 0
        or k.close_time - k.open_time != span - 1
        or k.open_time > now + span + 5 * 60_000
    )


def test_the_fast_candle_check_accepts_exactly_the_candles_that_break_no_rule():
    """validate_kline's one-comparison path against the rules written out one by one, over
    candles built from edge values (NaN, inf, zero, negative, swapped high/low, off-span, future)."""
    import random

    from libs.common.klines import now_ms, validate_kline

    rng = random.Random(7)
    nan, inf = float("nan"), float("inf")
    price = [1.0, 2.0, 3.0, 0.0, -1.0, nan, inf]
    amount = [0.0, 5.0, -0.5, nan, inf]
    now = now_ms()
    accepted = refused = 0
    for _ in range(20_000):
        # A real candle with each field swapped for an edge value now and then.
        def pick(good, edges):
            return rng.choice(edges) if rng.random() < 0.12 else good

        interval = pick("1m", ["1h", "7m"])
        span = {"1m": 60_000, "1h": 3_600_000}.get(interval, 420_000)
        open_time = pick(now - 3_600_000, [0, -60_000, now, now + 10 * span + 3_600_000])
        k = Kline(
            symbol=pick("BTCUSDT", ["btcusdt", "BTC-USDT", ""]), interval=interval,
            open_time=open_time, close_time=open_time + pick(span - 1, [span, 0, 59_999]),
            open=pick(2.0, price), high=pick(3.0, price), low=pick(1.0, price), close=pick(2.5, price),
            volume=pick(5.0, amount), quote_volume=pick(5.0, amount), trades=pick(3, [0, -1]),
            taker_buy_base=pick(1.0, amount), taker_buy_quote=pick(1.0, amount),
        )
        try:
            validate_kline(k)
            ok = True
        except InvalidKline as exc:
            ok = False
            assert exc.reason, k
        assert ok == (not _breaks_a_rule(k, now)), k
        accepted += ok
        refused += not ok
    assert accepted > 100 and refused > 100  # both sides were exercised


def test_to_dict_holds_every_field_as_dataclasses_asdict_does():
    import dataclasses

    k = Kline("BTCUSDT", "1m", 1_776_211_200_000, 1_776_211_259_999, 74_000.1, 74_100.2, 73_900.3, 74_050.4,
              12.5, 925_000.1, 1234, 6.1, 451_000.2, False)
    d = k.to_dict()
    assert d == dataclasses.asdict(k)
    assert list(d) == [f.name for f in dataclasses.fields(Kline)]
    d["close"] = 0.0  # a fresh dict: the candle itself is untouched
    assert k.close == 74_050.4
