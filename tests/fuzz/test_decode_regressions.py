"""Decoding bugs the fuzz found, each pinned by the input that showed it."""

from __future__ import annotations

import orjson
import pytest
from pydantic import ValidationError

from libs.common import topics
from libs.common.bus.framing import Decoder
from libs.common.contracts import EVENT_TYPES, KlineEvent
from libs.common.klines import InvalidKline, kline_from_row, parse_ws_kline
from tests.fuzz.samples import SAMPLES

KLINE = orjson.dumps(SAMPLES[topics.KLINES])


def test_an_empty_entry_in_a_batch_is_refused_not_silently_dropped():
    # The batch decode joins entries into one JSON array: b"" made "[]", an empty list for a
    # batch of one, so the entry had no event and no reason.
    events, bad = Decoder(KlineEvent).many([b""])
    assert events == [None] and list(bad) == [0]


def test_one_entry_holding_two_events_cannot_shift_its_neighbours():
    # '{..},{..}' in one entry made the array one longer than the batch: event i no longer
    # belonged to entry i.
    events, bad = Decoder(KlineEvent).many([KLINE + b"," + KLINE, KLINE])
    assert len(events) == 2 and list(bad) == [0] and events[1] is not None


def test_integers_beyond_64_bits_are_refused_at_decode():
    # pydantic takes any size of int; orjson then failed to write the event again (TypeError).
    with pytest.raises(ValidationError, match="64 bits"):
        EVENT_TYPES[topics.DATASETS].model_validate({**SAMPLES[topics.DATASETS], "start": "18446744073709551616"})
    with pytest.raises(ValidationError, match="64 bits"):
        EVENT_TYPES[topics.MODELS].model_validate({**SAMPLES[topics.MODELS], "train_range": [0, 1 << 64]})
    _, bad = Decoder(EVENT_TYPES[topics.ALERTS]).many([orjson.dumps(SAMPLES[topics.ALERTS])[:-1] + b',"open_time":-9223372036854775809}'])
    assert list(bad) == [0]


def test_a_websocket_kline_with_a_trade_count_beyond_64_bits_is_invalid():
    msg = {"e": "kline", "E": 1, "s": "BTCUSDT", "k": {
        "t": 1_680_307_200_000, "T": 1_680_307_259_999, "s": "BTCUSDT", "i": "1m", "o": "1", "c": "1", "h": "1",
        "l": "1", "v": "1", "n": 1 << 70, "x": True}}
    with pytest.raises(InvalidKline, match="trades"):
        parse_ws_kline(_big(msg))


def _big(msg: dict) -> bytes:
    import json

    return json.dumps(msg).encode()


@pytest.mark.parametrize("row", [True, None, 7, "1680307200000,1,1,1,1,1,1680307259999", {"0": 1}])
def test_a_rest_row_that_is_not_an_array_is_an_invalid_kline(row):
    with pytest.raises(InvalidKline, match="not an array"):
        kline_from_row(row, "BTCUSDT", "1m")


def test_a_rest_row_with_an_infinite_time_is_an_invalid_kline():
    with pytest.raises(InvalidKline, match="unreadable"):
        kline_from_row(["1e999", "1", "1", "1", "1", "1", "1680307259999"], "BTCUSDT", "1m")
