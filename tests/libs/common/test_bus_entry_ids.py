"""The one entry-id ordering (libs.common.bus.framing), against Redis's own rules."""

import pytest
import redis.asyncio as aioredis

from libs.common.bus.framing import MAX_ENTRY_SEQ, entry_id_before, entry_id_key


def test_ids_sort_numerically_not_as_text():
    ids = ["10-0", "9-5", "9-10", b"9-2", "100"]
    # "100" is an incomplete id: Redis reads it as 100-0
    assert sorted(ids, key=entry_id_key) == [b"9-2", "9-5", "9-10", "10-0", "100"]


@pytest.mark.parametrize(
    ("entry_id", "before"),
    [("5-3", "5-2"), (b"5-1", "5-0"), ("5-0", f"4-{MAX_ENTRY_SEQ}"), ("0-1", "0-0"), ("0-0", "0-0")],
)
def test_the_id_just_before(entry_id, before):
    assert entry_id_before(entry_id) == before
    assert MAX_ENTRY_SEQ == 18446744073709551615  # Redis's sequence is an unsigned 64-bit integer


async def test_redis_reads_the_id_before_as_just_below(redis_url):
    redis_client = aioredis.from_url(redis_url)
    key = "test:entry-ids"
    await redis_client.xadd(key, {"v": 1}, id="7-0")
    await redis_client.xadd(key, {"v": 2}, id="8-0")
    got = await redis_client.xrange(key, min=entry_id_before("8-0"), max="8-0")
    assert [e[0] for e in got] == [b"8-0"]
    got = await redis_client.xrevrange(key, max=entry_id_before("8-0"), min="-")
    assert [e[0] for e in got] == [b"7-0"]
    await redis_client.aclose()
