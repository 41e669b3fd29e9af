"""INFO says rates, once a minute: counts add up between lines, nothing is written while idle."""

from __future__ import annotations

import logging

from services.ingest.ratelog import MinuteLog


def test_one_line_a_minute_with_the_counts_of_that_minute(caplog):
    now = [0.0]
    minute = MinuteLog(logging.getLogger("klinebus.test"), "ingest", ("published_ws", "duplicates"), clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="klinebus.test"):
        for _ in range(500):  # a burst of closes: no line per candle
            minute.add(published_ws=1, duplicates=0)
        assert caplog.records == []
        now[0] = 60.0
        minute.add(published_ws=1, duplicates=2)
        now[0] = 200.0  # an idle stretch writes nothing by itself
        assert len(caplog.records) == 1
        minute.add(published_rest=3)
    first, second = (r.getMessage() for r in caplog.records)
    assert first == "ingest: last 60 s: 501 published ws, 2 duplicates"
    assert second == "ingest: last 140 s: 3 published rest"
