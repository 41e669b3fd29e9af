"""A first deployment: features.v1 holds nothing before the service starts, the klines archive does.
The window's older rows come from the archive through the shared indicator library, so the first
live candle is answered with the forecast an uninterrupted service would have made; a stream whose
archive is unreadable warms up live without holding the other."""

from __future__ import annotations

import pytest

from libs.common import topics
from libs.common.archive import ParquetArchive
from libs.common.klines import Kline
from services.inference.backfill import archive_rows
from tests.candles import BTC_15M, load
from tests.services.inference.models import feature_events, publish, window_of
from tests.services.inference.test_app import count_of, forecasts, metric, poll, runtime
from tests.streams import add_events, read_topic

# ema_20 and rsi_14 depend on where the series starts: a window computed from anything but the
# archive's first candle would differ.
FEATURES = ("close", "ema_20", "rsi_14")
LOOKBACK = 8
ARCHIVED = 200  # candles 0..199 in the archive, 200.. arrive live
LIVE = 6
M15 = 900_000


def archive(root, symbol: str, upto: int) -> None:
    c = load(BTC_15M)
    ParquetArchive(str(root)).write(
        Kline(symbol, "15m", int(c.open_time[i]), int(c.open_time[i]) + M15 - 1, float(c.open[i]), float(c.high[i]),
              float(c.low[i]), float(c.close[i]), float(c.volume[i]))
        for i in range(upto)
    )


def test_archive_rows_equal_the_features_a_batch_over_the_whole_history_gives(tmp_path):
    archive(tmp_path / "archive", "BTCUSDT", ARCHIVED)
    rows = archive_rows(str(tmp_path / "archive"), "BTCUSDT", "15m", "all-v1", before=2_000_000_000_000, keep=5)
    events = feature_events(ARCHIVED, feature_set="all-v1")
    assert [r[0] for r in rows] == [e.open_time for e in events[-5:]]
    for (open_time, close, fs, values), ev in zip(rows, events[-5:]):
        assert fs == "all-v1" and close == ev.close and values.keys() == ev.values.keys()
        for name, v in ev.values.items():
            assert values[name] == pytest.approx(v, rel=1e-12, abs=1e-12), name
    # Only candles before ``before``; a stream not archived has no rows.
    assert archive_rows(str(tmp_path / "archive"), "BTCUSDT", "15m", "skeleton-v1", events[3].open_time, 10)[-1][0] \
        == events[2].open_time
    assert archive_rows(str(tmp_path / "archive"), "ETHUSDT", "15m", "skeleton-v1", 2_000_000_000_000, 10) == []


async def test_the_first_live_candle_of_a_first_deployment_is_answered_from_the_archive(redis_url, tmp_path):
    built = publish(tmp_path / "reg", tmp_path, "arch", seed=5, features=FEATURES, lookback=LOOKBACK,
                    serves=(("BTCUSDT", "15m"), ("ETHUSDT", "15m")))
    archive(tmp_path / "archive", "BTCUSDT", ARCHIVED)  # the default root: <data_dir>/archive
    broken = tmp_path / "archive" / "ETHUSDT" / "15m"
    broken.mkdir(parents=True)
    (broken / "2023-04.parquet").write_bytes(b"PAR1 torn by a full disk")
    before = metric("archive_window_failures_total", interval="15m")
    # Features as the features service publishes them after warming up from the same archive.
    events = feature_events(ARCHIVED + LIVE + LOOKBACK)
    eth = [e.model_copy(update={"symbol": "ETHUSDT"}) for e in events]
    rt = runtime(redis_url, tmp_path)
    await rt.start(http=False)
    try:
        live = range(ARCHIVED, ARCHIVED + LIVE)
        await add_events(redis_url, [x for i in live for x in (events[i], eth[i])])  # both streams interleaved
        await poll(lambda: count_of(redis_url, "arch", LIVE))  # BTCUSDT's; ETHUSDT has no full window yet
        await add_events(redis_url, eth[ARCHIVED + LIVE:ARCHIVED + LIVE + LOOKBACK])
        eth_from = ARCHIVED + LOOKBACK - 1  # live only: the first full window
        n_eth = ARCHIVED + LIVE + LOOKBACK - eth_from

        async def done() -> bool:
            return len([e for e in await forecasts(redis_url, "arch") if e["symbol"] == "ETHUSDT"]) >= n_eth

        await poll(done)
        got = await forecasts(redis_url, "arch")
    finally:
        await rt.stop()
    btc = [e for e in got if e["symbol"] == "BTCUSDT"]
    # Every live candle answered, the first one included, with the window a batch over the whole
    # history gives (computed here from the events, not by the service).
    assert [e["open_time"] for e in btc] == [events[i].open_time for i in live]
    for e, i in zip(btc, live):
        want = built.expected(window_of(events, i, FEATURES, LOOKBACK))[0]
        assert e["predicted"]["close"] == pytest.approx(want, rel=1e-6), i
    # The unreadable archive: one counted failure, the stream warmed up live.
    assert metric("archive_window_failures_total", interval="15m") == before + 1
    eth_got = [e for e in got if e["symbol"] == "ETHUSDT"]
    assert [e["open_time"] for e in eth_got] == [ev.open_time for ev in eth[eth_from:ARCHIVED + LIVE + LOOKBACK]]
    assert eth_got[0]["predicted"]["close"] == pytest.approx(
        built.expected(window_of(eth, eth_from, FEATURES, LOOKBACK))[0], rel=1e-6)
    assert metric("archive_window_candles_total", interval="15m") >= LOOKBACK
    assert await read_topic(redis_url, topics.DEAD_LETTERS) == []


async def test_after_a_restart_a_stream_short_of_its_lookback_is_filled_from_the_archive(redis_url, tmp_path):
    """The first run had no archive (the stream warmed up live and saw 3 candles, too few for a
    forecast); the restarted service has one: the 3 stored candles come back from features.v1,
    the archive's go in front of them, and the next live candle is answered as an uninterrupted
    service with the whole history would have."""
    built = publish(tmp_path / "reg", tmp_path, "arch", seed=6, features=FEATURES, lookback=LOOKBACK)
    events = feature_events(ARCHIVED + 5)
    first = runtime(redis_url, tmp_path, archive_url=str(tmp_path / "empty"))
    await first.start(http=False)
    skipped = metric("skipped_total", model="arch", reason="too_few_candles")
    try:
        await add_events(redis_url, events[ARCHIVED:ARCHIVED + 3])

        async def seen() -> bool:
            return metric("skipped_total", model="arch", reason="too_few_candles") >= skipped + 3

        await poll(seen)
    finally:
        await first.stop()
    archive(tmp_path / "archive", "BTCUSDT", ARCHIVED)
    second = runtime(redis_url, tmp_path)
    await second.start(http=False)
    try:
        await add_events(redis_url, events[ARCHIVED + 3:])
        await poll(lambda: count_of(redis_url, "arch", 2))
        got = await forecasts(redis_url, "arch")
    finally:
        await second.stop()
    assert [e["open_time"] for e in got] == [ev.open_time for ev in events[ARCHIVED + 3:]]
    for e, i in zip(got, range(ARCHIVED + 3, ARCHIVED + 5)):
        assert e["predicted"]["close"] == pytest.approx(built.expected(window_of(events, i, FEATURES, LOOKBACK))[0], rel=1e-6)
