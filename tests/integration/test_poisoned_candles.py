"""Poisoned candles of one warm key mixed into real batches of other keys' real candles, through
real processes (``klinebus run features`` and ``klinebus run inference``) on a real redis-server
(issue 21: three clean candles of other symbols and one good candle of the poisoned key were
lost, ten poisoned candles published).

The poisoned key's candles are real ones; at some open times a poisoned entry stands in for the
real candle: extreme but finite numbers (which pass KlineEvent's rules), an impossible candle,
a wrong type, an oversized payload; broken JSON comes in between. Every clean candle of every
key must arrive exactly once on features.v1 (values equal to the batch computation over that
key's clean candles) and on predictions.v1, and every poisoned entry must be a dead letter."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import orjson
import pytest

from libs.common import topics
from libs.common.bus import DATA_FIELD
from libs.common.contracts import KlineEvent
from libs.common.redis_server import EmbeddedRedis
from tests.integration.fault_harness import DRAIN_TIMEOUT_S, Pipeline, drained, shipped, verify, wait_until
from tests.streams import read_topic

pytestmark = pytest.mark.timeout(900)

CLEAN = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
POISONED = "BNBUSDT"  # BTCUSDT's real candles under another name: warm before the first poison
CANDLES = 120
FIRST_POISON = 40  # the feature set's warm-up is 20 candles
PER_STEP = 4 * 10  # ten minutes of every key per step: batches mix every key's candles
STEP_S = 0.02


def poisons(candle: KlineEvent) -> list[tuple[str, bytes]]:
    """(kind, payload) standing in for ``candle``, one per kind, in turn."""
    good = candle.model_dump()
    return [
        ("volume beyond a kline", orjson.dumps({**good, "volume": 1.7e308})),
        ("prices beyond a kline", orjson.dumps({**good, "open": 1e308, "high": 1e308, "low": 1e308, "close": 1e308})),
        ("price below a tick", orjson.dumps({**good, "open": 1e-12, "low": 1e-12})),
        ("quote volume beyond a kline", orjson.dumps({**good, "quote_volume": 1e300})),
        ("impossible: high below low", orjson.dumps({**good, "high": good["low"] * 0.5})),
        ("wrong type", orjson.dumps({**good, "open": "a lot"})),
        ("oversized", orjson.dumps({**good, "padding": "x" * (1 << 20)})),
    ]


def feed(candles: dict[str, list]) -> tuple[list[bytes], dict[str, list], list[str]]:
    """Entries in time order (every key's candle per minute), the clean candles per key, and the
    kind of each poisoned entry."""
    kinds = iter(range(10_000))
    entries: list[bytes] = []
    clean: dict[str, list] = {s: [] for s in candles}
    poisoned: list[str] = []
    for i in range(CANDLES):
        for symbol, ks in candles.items():
            event = KlineEvent.from_kline(ks[i], "ws")
            if symbol == POISONED and i >= FIRST_POISON and i % 8 == 0:
                n = next(kinds)
                kind, payload = poisons(event)[n % 7]
                entries.append(payload)
                poisoned.append(kind)
                if n % 2:  # broken JSON between two real candles, now and then
                    entries.append(b'{"symbol": "' + POISONED.encode() + b'", "open_time": ')
                    poisoned.append("broken JSON")
                continue
            entries.append(event.to_json())
            clean[symbol].append(ks[i])
    return entries, clean, poisoned


async def test_poisoned_candles_of_a_warm_key_cost_no_clean_candle(tmp_path):
    candles = shipped(CLEAN, CANDLES)
    candles[POISONED] = [replace(k, symbol=POISONED) for k in candles["BTCUSDT"]]
    entries, clean, poisoned = feed(candles)
    total_clean = sum(len(ks) for ks in clean.values())
    with EmbeddedRedis(tmp_path / "redis", persistent=True) as server:
        url = server.url
        pipeline = Pipeline(server, tmp_path, ingest=None, features=1, inference=True)
        try:
            await pipeline.start()
            c = await pipeline.client()
            try:
                stream = topics.stream_key(topics.KLINES)
                for start in range(0, len(entries), PER_STEP):
                    for payload in entries[start : start + PER_STEP]:
                        await c.xadd(stream, {DATA_FIELD: payload})
                    await asyncio.sleep(STEP_S)  # the pace of a live feed: batches of every size

                async def done() -> bool:
                    return (await c.xlen(topics.stream_key(topics.FEATURES)) >= total_clean
                            and await c.xlen(topics.stream_key(topics.PREDICTIONS)) >= total_clean
                            and all([await drained(c, t, g) for t, g in pipeline.groups()]))

                await wait_until(done, DRAIN_TIMEOUT_S, "drained and acknowledged", pipeline.services)
            finally:
                await c.aclose()
            await pipeline.stop_all()
            features = await read_topic(url, topics.FEATURES)
            predictions = await read_topic(url, topics.PREDICTIONS)
            letters = await read_topic(url, topics.DEAD_LETTERS)
        finally:
            pipeline.stop()
        figures = verify(url, clean, None, features, predictions)
    assert figures["lost"] == 0 and figures["doubled"] == 0
    assert len(features) == total_clean  # no poisoned candle was published
    mine = [letter for letter in letters if letter["service"] == "features" and letter["source"] == topics.KLINES]
    assert len(mine) == len(poisoned), [letter["reason"] for letter in mine]
    reasons = " | ".join(letter["reason"] for letter in mine)
    assert reasons.count("beyond what a Binance kline can carry") == sum(
        k.endswith("beyond a kline") or k == "price below a tick" for k in poisoned)
    # inference never saw a poisoned candle: nothing of features.v1 was refused
    assert [letter for letter in letters if letter["source"] == topics.FEATURES] == []
