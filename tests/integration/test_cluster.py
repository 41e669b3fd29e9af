"""The walking skeleton on a real 3-master Redis Cluster (``redis+cluster://``): the same
end-to-end guarantees as on one server, with each topic's stream on its own slot and its
companion keys (once-per-candle guard, indicator checkpoint) in that stream's slot."""

from __future__ import annotations

import pytest
from redis.asyncio.cluster import RedisCluster

from libs.common import topics
from libs.common.bus import LAST_OPEN_TIME, redis_client
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


@pytest.fixture
async def cluster_url(redis_cluster_url: str) -> str:
    """The session's cluster with every primary emptied for this test."""
    client = redis_client(redis_cluster_url)
    assert isinstance(client, RedisCluster)
    try:
        await client.flushall(target_nodes=RedisCluster.PRIMARIES)
    finally:
        await client.aclose()
    return redis_cluster_url


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
