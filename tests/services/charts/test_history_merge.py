"""Merging candles read back from klines.v1 into the chart history."""

from __future__ import annotations



from libs.common.klines import read_kline_csv
from services.charts.history import CandleHistory


from tests.libs.charting.conftest import DATA


def test_merge_puts_older_candles_before_the_live_ones():
    klines = read_kline_csv(DATA, "BTCUSDT", "1m")[:10]
    h = CandleHistory(capacity=8)
    h.add(klines[9])
    assert h.merge(klines[:9]) == 9
    assert h.count("BTCUSDT", "1m") == 8
    assert [r[0] for r in h._rows[("BTCUSDT", "1m")]] == [k.open_time for k in klines[2:]]
    assert not h.add(klines[5])  # an older candle after the merge still changes nothing
