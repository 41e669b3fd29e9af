"""Partitioned ordered topics on a real Redis (issue 23): a key always maps to one partition, each
partition has its own fenced lease, replicas balance the partitions among themselves while
events flow, and every key's events are handled once and in order through the moves."""

from __future__ import annotations

import asyncio
import zlib

import pytest
import redis.asyncio as aioredis

from libs.common import topics
from libs.common.bus import DATA_FIELD, Bus, LeaseLost, OwnerLease, failures
from libs.common.bus.balance import members_key, shares
from libs.common.bus.groups import Acker, PartitionCountMismatch, ensure_group, lease_key
from libs.common.bus.monitor import GroupSampler
from libs.common.contracts import KlineEvent

P = 4
LEASE_MS = 900
SYMBOLS = [f"S{i:02d}USDT" for i in range(24)]


def kline(symbol: str, i: int, interval: str = "1m") -> KlineEvent:
    t = i * 60_000
    return KlineEvent(symbol=symbol, interval=interval, open_time=t, close_time=t + 59_999,
                      open=100.0, high=101.0, low=99.0, close=100.5, volume=3.0)


async def until(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"{what} not met in time"
        await asyncio.sleep(0.02)


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(failures, "RETRY_FIRST_S", 0.01)
    monkeypatch.setattr(failures, "RETRY_MAX_S", 0.05)


@pytest.fixture
async def client(redis_url):
    c = aioredis.Redis.from_url(redis_url)
    yield c
    await c.aclose()


# --- routing ---------------------------------------------------------------------------------


def test_a_key_always_maps_to_the_same_partition_and_partition_zero_is_the_old_key():
    assert topics.partition_of("BTCUSDT", "1m", 1) == 0
    for p in (2, 3, 4, 16):
        assert topics.partition_of("BTCUSDT", "1m", p) == zlib.crc32(b"BTCUSDT:1m") % p
    # Pinned: another process (or language) computes the same partition.
    assert [topics.partition_of(s, "1m", 4) for s in ("BTCUSDT", "ETHUSDT", "BNBUSDT")] == [
        zlib.crc32(f"{s}:1m".encode()) % 4 for s in ("BTCUSDT", "ETHUSDT", "BNBUSDT")]
    assert {topics.partition_of(s, i, 4) for s in SYMBOLS for i in ("1m", "5m")} == set(range(4))
    assert topics.stream_key(topics.KLINES) == topics.stream_key(topics.KLINES, 0) == "klinebus:{klines.v1}"
    assert topics.stream_key(topics.KLINES, 3) == "klinebus:{klines.v1#3}"
    assert topics.stream_keys(topics.FEATURES, 2) == ["klinebus:{features.v1}", "klinebus:{features.v1#1}"]
    assert topics.stream_keys(topics.PREDICTIONS, 4) == ["klinebus:{predictions.v1}"]
    assert topics.stream_companion_key(topics.FEATURES, "engine-state", 2) == "klinebus:{features.v1#2}:engine-state"
    with pytest.raises(ValueError):
        topics.stream_key(topics.PREDICTIONS, 1)  # not a partitioned topic


def test_shares_spread_evenly_and_the_extra_ones_stay_where_they_are():
    assert shares(["a", "b", "c"], {}, 4) == {"a": 2, "b": 1, "c": 1}
    assert shares(["a", "b", "c"], {"b": 2, "c": 2}, 4) == {"b": 2, "c": 1, "a": 1}
    assert shares(["a", "b"], {"b": 1}, 1) == {"b": 1, "a": 0}  # one partition: the owner keeps it


async def test_publishes_go_to_their_key_s_partition_once_per_candle(redis_url, client):
    bus = Bus("ingest", redis_url, consumer="i", partitions=P)
    bus.publisher(topics.KLINES, KlineEvent)
    await bus.start()
    guard = bus.once_per_candle(topics.KLINES, client)
    events = [kline(s, i) for i in range(3) for s in SYMBOLS]
    assert sum(a for a, _ in await guard.publish_many(events)) == len(events)
    assert sum(a for a, _ in await guard.publish_many(events)) == 0  # the guard holds per partition too
    for s in ("ZZUSDT", "YYUSDT", "XXUSDT", "WWUSDT"):
        await bus.publish(kline(s, 7))  # the plain publisher routes too
    seen: dict[tuple[str, str], list[int]] = {}
    for p, key in enumerate(topics.stream_keys(topics.KLINES, P)):
        for _, fields in await client.xrange(key):
            e = KlineEvent.model_validate_json(fields[DATA_FIELD.encode()])
            assert topics.partition_of(e.symbol, e.interval, P) == p
            seen.setdefault((e.symbol, e.interval), []).append(e.open_time // 60_000)
    for s in ("ZZUSDT", "YYUSDT", "XXUSDT", "WWUSDT"):
        assert seen.pop((s, "1m")) == [7]
    assert seen == {(s, "1m"): [0, 1, 2] for s in SYMBOLS}
    assert await guard.last_open_times() == {(s, "1m"): 2 * 60_000 for s in SYMBOLS}
    await bus.stop()


async def test_a_service_started_with_another_partition_count_refuses_to_start(redis_url, client):
    first = Bus("features", redis_url, consumer="a", partitions=P)
    first.ordered(topics.KLINES, KlineEvent)(_ignore)
    await first.start()
    await first.stop()
    assert await client.get(topics.partitions_key()) == b"4"
    other = Bus("features", redis_url, consumer="b", partitions=2)
    other.ordered(topics.KLINES, KlineEvent)(_ignore)
    with pytest.raises(PartitionCountMismatch) as err:
        await other.start()
    msg = str(err.value)
    assert "\n" not in msg and "KLINEBUS_PARTITIONS=2" in msg and "4 partitions" in msg
    assert "docs/bus.md#changing-the-partition-count" in msg
    await other.stop()


async def _ignore(event, entry_id) -> None:
    return None


# --- ownership, balancing, order -------------------------------------------------------------


class Replica:
    """One in-process replica of a service consuming klines.v1 with ``P`` partitions."""

    def __init__(self, name: str, url: str, log: list, calls: list) -> None:
        self.name = name
        self.bus = bus = Bus("features", url, consumer=name, owner_lease_ms=LEASE_MS, partitions=P)

        @bus.ordered_batch(topics.KLINES, KlineEvent, max_records=7)
        async def handle(events, entry_ids) -> None:
            for e in events:
                log.append((name, e.symbol, e.open_time // 60_000))
            await asyncio.sleep(0)  # let a rebalance land in the middle of the stream

        @bus.on_owner
        async def took(partition: int) -> None:
            calls.append((name, "owner", partition))

        @bus.on_release
        async def gave(partition: int) -> None:
            calls.append((name, "release", partition))

    def owned(self) -> frozenset[int]:
        return self.bus.owned_partitions()

    async def crash(self) -> None:
        """Dies without a word: its tasks end, its leases and membership are left to expire.
        Cancelled until they are done: redis-py sometimes loses a cancellation that lands inside
        a command (libs/common/bus/ordered.py), which a dead process never has to survive."""
        balancer = self.bus._consumers[0]
        deadline = asyncio.get_running_loop().time() + 20
        while True:
            tasks = [*self.bus._tasks, *balancer._tasks.values()]
            if all(t.done() for t in tasks):
                break
            assert asyncio.get_running_loop().time() < deadline, "the replica's tasks did not end"
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=0.05)
        for c in (*self.bus._clients, self.bus._client):
            await c.aclose()
        await self.bus.broker.stop()


def balanced(replicas: list[Replica]) -> bool:
    owned = [r.owned() for r in replicas]
    union = frozenset().union(*owned)
    disjoint = sum(len(o) for o in owned) == len(union)
    counts = [len(o) for o in owned]
    return disjoint and union == frozenset(range(P)) and max(counts) - min(counts) <= 1


async def test_replicas_balance_partitions_and_every_key_is_handled_once_in_order(redis_url, client):
    log: list[tuple[str, str, int]] = []
    calls: list[tuple[str, str, int]] = []
    producer_bus = Bus("ingest", redis_url, consumer="i", partitions=P)
    producer_bus.publisher(topics.KLINES, KlineEvent)
    guard = producer_bus.once_per_candle(topics.KLINES, client)
    produced = {"rounds": 0}
    stop_producing = asyncio.Event()

    async def produce() -> None:
        i = 0
        while not stop_producing.is_set():
            await guard.publish_many([kline(s, i) for s in SYMBOLS])
            i += 1
            produced["rounds"] = i
            await asyncio.sleep(0.01)  # pacing, so the stream is still flowing through every move

    a = Replica("a", redis_url, log, calls)
    b = Replica("b", redis_url, log, calls)
    c = Replica("c", redis_url, log, calls)
    producer = asyncio.create_task(produce())
    stopped: list[Replica] = []
    try:
        await a.bus.start()
        assert a.owned() == frozenset(range(P))  # alone, it takes every partition before start returns
        await until(lambda: produced["rounds"] >= 5)

        await b.bus.start()
        await until(lambda: balanced([a, b]), what="a and b balanced")
        moved_to_b = b.owned()
        assert len(moved_to_b) == 2
        await until(lambda: produced["rounds"] >= 15)

        await c.bus.start()
        await until(lambda: balanced([a, b, c]), what="a, b and c balanced")
        await until(lambda: produced["rounds"] >= 25)

        b_had = b.owned()
        await b.bus.stop()  # a clean stop: its partitions go to the others
        stopped.append(b)
        await until(lambda: balanced([a, c]), what="a and c balanced after b stopped")
        await until(lambda: produced["rounds"] >= 35)

        c_had = c.owned()
        await c.crash()  # its leases expire; a takes its partitions within about one lease time
        stopped.append(c)
        await until(lambda: a.owned() == frozenset(range(P)), what="a owns all after c died")
        await until(lambda: produced["rounds"] >= 45)
        stop_producing.set()
        await producer
        rounds = produced["rounds"]
        await until(lambda: {(s, i) for _, s, i in log} >= {(s, i) for s in SYMBOLS for i in range(rounds)},
                    what="every event handled")
    finally:
        stop_producing.set()
        await asyncio.gather(producer, return_exceptions=True)
        for r in (a, b, c):
            if r not in stopped:
                await r.bus.stop()
        await producer_bus.stop()

    # Per key, in handling order: every candle once, in order; the only repeats are candles the
    # crashed replica handled without acknowledging them, handled again after its lease expired.
    for s in SYMBOLS:
        seq = [(who, i) for who, sym, i in log if sym == s]
        kept: list[int] = []
        for k, (who, i) in enumerate(seq):
            redone = any(j == i for _, j in seq[k + 1:])
            if redone:
                assert who == "c", (s, who, i)  # a clean handover re-handles nothing
                continue
            kept.append(i)
        assert kept == list(range(rounds)), s

    # Hooks: each partition taken runs on_owner with it; given up cleanly, on_release with it;
    # the crashed replica released nothing.
    def of(who: str, what: str) -> list[int]:
        return [p for w, k, p in calls if w == who and k == what]

    assert sorted(of("a", "owner")[:P]) == list(range(P))
    assert set(of("b", "owner")) >= moved_to_b
    assert set(of("b", "release")) == set(of("b", "owner")) and b_had <= set(of("b", "release"))
    assert set(of("a", "release")) >= moved_to_b  # a gave b's share up cleanly
    assert of("c", "release") == [] and c_had <= set(of("c", "owner"))
    # a took back what c held (after its lease expired): on_owner ran for each, without a release by c.
    assert c_had <= set(of("a", "owner")[P:])
    for key in topics.stream_keys(topics.KLINES, P):
        (group,) = await client.xinfo_groups(key)
        assert group["pending"] == 0 and group["lag"] == 0


async def test_one_partition_keeps_one_owner_and_a_hot_standby(redis_url, client):
    log: list = []
    calls: list = []
    a = Bus("features", redis_url, consumer="a", owner_lease_ms=LEASE_MS)
    b = Bus("features", redis_url, consumer="b", owner_lease_ms=LEASE_MS)
    for name, bus in (("a", a), ("b", b)):
        bus.ordered(topics.KLINES, KlineEvent)(_ignore)
        bus.on_owner(_record(calls, name, "owner"))
        bus.on_release(_record(calls, name, "release"))
    await a.start()
    await b.start()
    try:
        assert a.owned_partitions() == frozenset({0}) and b.owned_partitions() == frozenset()
        await a.stop()
        await until(lambda: b.owned_partitions() == frozenset({0}), what="b took over")
    finally:
        await b.stop()
    assert calls == [("a", "owner", 0), ("a", "release", 0), ("b", "owner", 0), ("b", "release", 0)]
    del log


def _record(calls: list, name: str, what: str):
    async def hook(partition: int) -> None:
        calls.append((name, what, partition))

    return hook


async def test_a_deposed_owner_s_acknowledgement_is_refused_per_partition(redis_url, client):
    part = 2
    key = topics.stream_key(topics.KLINES, part)
    await ensure_group(client, topics.KLINES, "features", part)
    await client.xadd(key, {DATA_FIELD: kline("BTCUSDT", 0).to_json()})
    old = OwnerLease(client, "features", [topics.KLINES], "a", LEASE_MS, partition=part)
    assert await old.try_acquire()
    (_, entries), = await client.xreadgroup("features", "a", {key: ">"})
    ids = [entries[0][0].decode()]
    # a pauses past its lease; b takes the partition and overwrites the fence first thing
    await client.delete(old.key)
    new = OwnerLease(client, "features", [topics.KLINES], "b", LEASE_MS, partition=part)
    assert await new.try_acquire()
    assert await client.get(lease_key(topics.KLINES, "features", part)) == new.token.encode()
    with pytest.raises(LeaseLost):
        await Acker(client, topics.KLINES, "features", part).ack(ids, old.token)
    assert await Acker(client, topics.KLINES, "features", part).ack(ids, new.token) == 1
    # another partition's fence is another key: b's token there does not fence partition 1's owner
    other = OwnerLease(client, "features", [topics.KLINES], "a", LEASE_MS, partition=1)
    assert await other.try_acquire()
    assert other.key != new.key


# --- competing, broadcast, metrics -----------------------------------------------------------


async def test_competing_consumers_read_every_partition(redis_url, client):
    got: list[tuple[str, int]] = []
    bus = Bus("archive", redis_url, consumer="x", partitions=P)

    @bus.competing(topics.KLINES)
    async def handle(event: KlineEvent) -> None:
        got.append((event.symbol, event.open_time // 60_000))

    producer = Bus("ingest", redis_url, consumer="i", partitions=P)
    producer.publisher(topics.KLINES, KlineEvent)
    await producer.once_per_candle(topics.KLINES, client).publish_many([kline(s, 0) for s in SYMBOLS])
    await bus.start()
    try:
        await until(lambda: len(got) == len(SYMBOLS), what="every partition consumed")
        sampler = GroupSampler(bus.bus_metrics, topics.KLINES, "archive", P)
        await until(lambda: True)
        sample = await sampler.sample(client)
        assert sample["length"] == len(SYMBOLS)  # summed over the partitions
    finally:
        await bus.stop()
        await producer.stop()
    assert sorted(got) == sorted((s, 0) for s in SYMBOLS)


async def test_every_replica_sees_every_broadcast_entry_from_its_start(redis_url, client):
    seen: dict[str, list[int]] = {"a": [], "b": []}
    key = topics.stream_key(topics.KLINES)
    await client.xadd(key, {DATA_FIELD: kline("OLDUSDT", 0).to_json()})  # before the start: not seen
    buses = []
    for name in seen:
        bus = Bus("inference", redis_url, consumer=name)

        def handler(name=name):
            async def on_entry(event: KlineEvent, entry_id: str) -> None:
                seen[name].append(event.open_time // 60_000)
            return on_entry

        bus.broadcast(topics.KLINES, KlineEvent)(handler())
        buses.append(bus)
        await bus.start()
    try:
        for i in range(1, 6):
            await client.xadd(key, {DATA_FIELD: kline("BTCUSDT", i).to_json()})
        await until(lambda: all(len(v) == 5 for v in seen.values()) or any(b.fatal for b in buses),
                    what="both replicas saw every entry")
        assert [b.fatal for b in buses] == [None, None]
        assert seen == {"a": [1, 2, 3, 4, 5], "b": [1, 2, 3, 4, 5]}
        assert await client.xinfo_groups(key) == []  # no group: nothing pending anywhere
    finally:
        for bus in buses:
            await bus.stop()


async def test_a_broadcast_with_since_starts_after_what_the_start_up_read(redis_url, client):
    """An entry appended after the service's start-up read the topic, before the bus started
    (inference loading its models meanwhile), is delivered; what the start-up read is not."""
    seen: list[int] = []
    key = topics.stream_key(topics.KLINES)
    read_at_start_up = (await client.xadd(key, {DATA_FIELD: kline("BTCUSDT", 0).to_json()})).decode()
    await client.xadd(key, {DATA_FIELD: kline("BTCUSDT", 1).to_json()})  # the gap
    bus = Bus("inference", redis_url, consumer="a")

    @bus.broadcast(topics.KLINES, KlineEvent, since=lambda: read_at_start_up)
    async def on_entry(event: KlineEvent, entry_id: str) -> None:
        seen.append(event.open_time // 60_000)

    await bus.start()
    try:
        await client.xadd(key, {DATA_FIELD: kline("BTCUSDT", 2).to_json()})
        await until(lambda: len(seen) >= 2 or bus.fatal, what="the gap's entry and the next")
        assert bus.fatal is None and seen == [1, 2]
    finally:
        await bus.stop()


async def test_a_clean_stop_leaves_the_membership(redis_url, client):
    bus = Bus("features", redis_url, consumer="a", owner_lease_ms=LEASE_MS, partitions=P)
    bus.ordered(topics.KLINES, KlineEvent)(_ignore)
    await bus.start()
    assert await client.zrange(members_key("features"), 0, -1) == [b"a"]
    await bus.stop()
    assert await client.zrange(members_key("features"), 0, -1) == []
    assert all([await client.get(f"klinebus:owner:features{'#' + str(p) if p else ''}") is None for p in range(P)])


async def test_the_partition_count_changes_only_when_every_group_has_drained(redis_url, client):
    from libs.common.bus.groups import partitions_status, set_partitions

    producer = Bus("ingest", redis_url, consumer="i", partitions=P)
    producer.publisher(topics.KLINES, KlineEvent)
    await producer.start()
    await producer.once_per_candle(topics.KLINES, client).publish_many([kline(s, 0) for s in SYMBOLS])
    for p in range(P):
        await ensure_group(client, topics.KLINES, "features", p)
    recorded, rows = await partitions_status(client)
    assert recorded == P and {r[1] for r in rows} == {"features"} and sum(r[2] for r in rows) == len(SYMBOLS)
    with pytest.raises(ValueError, match="lag"):
        await set_partitions(client, 2)
    assert await client.get(topics.partitions_key()) == b"4"
    got: list = []
    bus = Bus("features", redis_url, consumer="a", owner_lease_ms=LEASE_MS, partitions=P)

    @bus.ordered(topics.KLINES, KlineEvent)
    async def handle(event, entry_id) -> None:
        got.append(event)

    await bus.start()
    await until(lambda: len(got) == len(SYMBOLS), what="drained")
    await bus.stop()
    await producer.stop()
    assert await set_partitions(client, 2) == P
    assert await client.get(topics.partitions_key()) == b"2"
