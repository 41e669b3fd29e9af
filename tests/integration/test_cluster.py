"""The walking skeleton on a real 3-master Redis Cluster (``redis+cluster://``): the same
end-to-end guarantees as on one server, with each topic's stream on its own slot and its
companion keys (once-per-candle guard, indicator checkpoint) in that stream's slot."""

from __future__ import annotations

import orjson
import pytest
from redis.asyncio.cluster import RedisCluster

from libs.common import topics
from libs.common.bus import DATA_FIELD, LAST_OPEN_TIME, redis_client
# The single-server skeleton tests, run here unchanged against the cluster (imported under
# names pytest does not collect twice).
from tests.integration.test_skeleton import (
    test_a_restarted_features_service_neither_drops_nor_doubles as restarted_features_neither_drops_nor_doubles,
)
from tests.integration.test_skeleton import (
    test_every_replayed_candle_yields_one_features_event_and_one_prediction_in_order as skeleton_yields_one_event_per_candle_in_order,
)

PIPELINE_TOPICS = (topics.KLINES, topics.FEATURES, topics.PREDICTIONS)


pytestmark = pytest.mark.slow


async def _flush(url: str) -> None:
    client = redis_client(url)
    assert isinstance(client, RedisCluster)
    try:
        await client.flushall(target_nodes=RedisCluster.PRIMARIES)
    finally:
        await client.aclose()


@pytest.fixture
async def cluster_url(redis_cluster_url: str):
    """The session's cluster with every primary emptied for this test, and emptied again after it
    (the recorded partition count of one test must not refuse the next test's services)."""
    await _flush(redis_cluster_url)
    yield redis_cluster_url
    await _flush(redis_cluster_url)


async def _slot(client: RedisCluster, key: str) -> int:
    # The server's own CRC16 of the hash tag, not the client's.
    return int(await client.execute_command("CLUSTER KEYSLOT", key, target_nodes=RedisCluster.RANDOM))


async def test_every_replayed_candle_yields_one_features_event_and_one_prediction_in_order_on_a_cluster(
    cluster_url, tmp_path
):
    await skeleton_yields_one_event_per_candle_in_order(cluster_url, tmp_path)

    client = redis_client(cluster_url)
    try:
        # Each topic's stream sits on its own slot, and these three on three different primaries.
        streams = [topics.stream_key(t) for t in PIPELINE_TOPICS]
        slots = [await _slot(client, k) for k in streams]
        assert len(set(slots)) == len(streams)
        owners = {client.get_node_from_key(k).name for k in streams}
        assert len(owners) == len(streams), owners
        for key in streams:  # the owning primary really holds the stream (a non-owner would answer MOVED)
            node = client.get_node_from_key(key)
            assert await client.execute_command("EXISTS", key, target_nodes=node) == 1
        # Companion keys the services wrote live in their stream's slot (Lua KEYS, checkpoint).
        companions = [
            topics.stream_companion_key(topics.FEATURES, LAST_OPEN_TIME),
            topics.stream_companion_key(topics.FEATURES, "engine-state"),
            topics.stream_companion_key(topics.PREDICTIONS, LAST_OPEN_TIME),
        ]
        for key in companions:
            assert await client.exists(key) == 1, key
        assert await _slot(client, companions[0]) == slots[1]
        assert await _slot(client, companions[1]) == slots[1]
        assert await _slot(client, companions[2]) == slots[2]
    finally:
        await client.aclose()


async def test_a_restarted_features_service_neither_drops_nor_doubles_on_a_cluster(cluster_url, tmp_path):
    """Checkpoint restore and pending recovery work through a cluster client as on one server."""
    await restarted_features_neither_drops_nor_doubles(cluster_url, tmp_path)


CLUSTER_PARTITIONS = 6  # enough hash tags for klines.v1's and features.v1's to cover 3 shards


async def test_the_partitions_of_one_topic_land_on_different_primaries_and_carry_the_pipeline(cluster_url, tmp_path):
    """The skeleton (ingest -> features -> inference) with klines.v1 and features.v1 split into
    partitions on the cluster: every candle once and in order per key, each partition's stream on
    the primary that owns its slot, and one topic's partitions spread over every primary."""
    from tests.integration.test_skeleton import run_skeleton, shipped
    from tests.streams import open_times_by_stream

    candles = shipped()
    expected = {key: [k.open_time for k in ks] for key, ks in candles.items()}
    klines, features, predictions = await run_skeleton(cluster_url, tmp_path, candles, partitions=CLUSTER_PARTITIONS)
    assert open_times_by_stream(klines) == expected
    assert open_times_by_stream(features) == expected
    assert open_times_by_stream(predictions) == expected

    client = redis_client(cluster_url)
    try:
        await client.initialize()  # the slot map, before asking it which primary owns a key
        primaries = {n.name for n in client.get_primaries()}
        assert len(primaries) == 3
        for topic in (topics.KLINES, topics.FEATURES):
            keys = topics.stream_keys(topic, CLUSTER_PARTITIONS)
            assert len({await _slot(client, k) for k in keys}) == len(keys)  # a slot per partition
            assert {client.get_node_from_key(k).name for k in keys} == primaries, topic
            # Each partition's stream, on the primary owning its slot, holds only keys that map to it.
            for p, key in enumerate(keys):
                node = client.get_node_from_key(key)
                rows = await client.xrange(key)
                if rows:
                    assert await client.execute_command("EXISTS", key, target_nodes=node) == 1
                events = [orjson.loads(f[DATA_FIELD.encode()]) for _, f in rows]
                assert {topics.partition_of(e["symbol"], e["interval"], CLUSTER_PARTITIONS) for e in events} <= {p}
    finally:
        await client.aclose()
