"""Consumer-group administration: creating groups where the service left off, acknowledging with
the position kept outside the group, the ownership lease of ordered groups, stale consumers.

* **Position.** Every acknowledgement also records the last acknowledged entry id in
  ``klinebus:{topic}:acked:<group>`` (same slot as the stream, written in the same Lua step as
  the XACK). If the group vanishes (Redis restarted without its data, a failover to a replica
  without the group, a deleted stream or group), it is recreated at that position, not at the
  start of the stream and not at its end.
* **Ownership.** A service's ordered groups have one active owner replica: a lease
  ``klinebus:owner:<group>`` taken with ``SET NX PX``, renewed at a third of its life, released on
  a clean stop. A second replica waits as a hot standby and takes over within one lease time of
  the owner's death. The lease is fenced: each ordered topic has a fence key
  ``klinebus:{topic}:owner:<group>`` (its stream's slot) holding the owner's token, written by a
  new owner first thing; the acknowledgement script refuses any other token, and the holder stops
  handing entries out once its lease may have expired.
"""

from __future__ import annotations

import logging
import time
import uuid

import redis.asyncio as aioredis

from libs.common import topics

log = logging.getLogger("klinebus.bus")

# KEYS[1] stream, KEYS[2] position key, KEYS[3] fence key; ARGV[1] fencing token ('' when the
# group has no lease), ARGV[2] group, ARGV[3..] ids in ascending order (as XREADGROUP returns
# them: the last is the highest). Returns the XACK count, or -1 when the caller's lease is gone
# (nothing acknowledged). The position never moves back (a competing reclaim acks older ids).
# In a competing group (no token) other replicas may still hold older entries: the position is
# then the id just before the oldest one pending, so a group recreated there hands those out
# again (a dead replica's entries were lost with a deleted group when the position was the
# highest id acknowledged: tests/integration/test_faults.py::test_a_deleted_archive_group_...).
_ACK = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[1] then
  return -1
end
local n = redis.call('XACK', KEYS[1], ARGV[2], unpack(ARGV, 3))
local top = ARGV[#ARGV]
local tm, ts = string.match(top, '(%d+)-(%d+)')
tm, ts = tonumber(tm), tonumber(ts)
if ARGV[1] == '' then
  local p = redis.call('XPENDING', KEYS[1], ARGV[2])
  if p[1] > 0 then
    local pm, ps = string.match(p[2], '(%d+)-(%d+)')
    pm, ps = tonumber(pm), tonumber(ps)
    if pm < tm or (pm == tm and ps <= ts) then
      if ps > 0 then
        top = string.format('%d-%d', pm, ps - 1)
        tm, ts = pm, ps - 1
      else
        top = string.format('%d-18446744073709551615', pm - 1)
        tm, ts = pm - 1, 18446744073709551615
      end
    end
  end
end
local cur = redis.call('GET', KEYS[2])
if cur then
  local cm, cs = string.match(cur, '(%d+)-(%d+)')
  cm, cs = tonumber(cm), tonumber(cs)
  if cm > tm or (cm == tm and cs >= ts) then return n end
end
redis.call('SET', KEYS[2], top)
return n
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def position_key(topic: str, group: str, partition: int = 0) -> str:
    return topics.stream_companion_key(topic, f"acked:{group}", partition)


def lease_key(topic: str, group: str, partition: int = 0) -> str:
    return topics.stream_companion_key(topic, f"owner:{group}", partition)


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class LeaseLost(Exception):
    """This replica no longer owns the ordered group: stop handing out entries."""


class Acker:
    """XACK plus the recorded position, in one Lua step, fenced by a lease token when given."""

    def __init__(self, client: aioredis.Redis, topic: str, group: str, partition: int = 0) -> None:
        self.stream = topics.stream_key(topic, partition)
        self.keys = [self.stream, position_key(topic, group, partition), lease_key(topic, group, partition)]
        self.group = group
        self._script = client.register_script(_ACK)

    async def ack(self, ids: list[str], token: str = "") -> int:
        n = await self._script(keys=self.keys, args=[token, self.group, *ids])
        if n == -1:
            raise LeaseLost(f"{self.group}: lease on {self.stream} is no longer ours")
        return int(n)


async def recorded_position(client: aioredis.Redis, topic: str, group: str, partition: int = 0) -> str | None:
    raw = await client.get(position_key(topic, group, partition))
    return _s(raw) if raw is not None else None


async def ensure_group(client: aioredis.Redis, topic: str, group: str, partition: int = 0) -> str | None:
    """Create ``group`` on ``topic`` if it does not exist: at the position this service last
    acknowledged, or at the start of the stream when it never acknowledged anything. Returns the
    id it was created at, or None when it already existed."""
    key = topics.stream_key(topic, partition)
    # A read first: XGROUP CREATE is refused under OOM even when the group exists.
    if await client.exists(key) and any(_s(g["name"]) == group for g in await client.xinfo_groups(key)):
        return None
    position = await recorded_position(client, topic, group, partition)
    start = position or "0"
    try:
        await client.xgroup_create(key, group, id=start, mkstream=True)
    except aioredis.ResponseError as exc:
        if "BUSYGROUP" in str(exc):
            return None
        raise
    return start


# KEYS[1] a fence key; ARGV[1] our token, ARGV[2] ttl, ARGV[3] '1' to take it over. Written by the
# lease holder after each acquisition and renewal; a renewal refuses to overwrite another holder's
# token (a newer owner's) and only extends its own (PEXPIRE: allowed while Redis refuses writes
# for lack of memory, so an OOM episode does not cost the owner its lease).
_FENCE = """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if cur and ARGV[3] == '0' then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


class PartitionCountMismatch(RuntimeError):
    """The deployment's streams are split into another number of partitions than this service's."""


async def check_partitions(client: aioredis.Redis, partitions: int) -> int:
    """Record ``partitions`` if no count is recorded; raise ``PartitionCountMismatch`` (one line)
    when another one is: a key's events would go to two partitions, and its order with them."""
    key = topics.partitions_key()
    await client.set(key, partitions, nx=True)  # SET NX GET would need Redis 7
    raw = await client.get(key)
    recorded = int(_s(raw)) if raw is not None else partitions
    if recorded != partitions:
        raise PartitionCountMismatch(
            f"KLINEBUS_PARTITIONS={partitions} but this deployment's streams are split into {recorded} partitions "
            f"(recorded in {key}); start with KLINEBUS_PARTITIONS={recorded}, or change the count as "
            "docs/bus.md#changing-the-partition-count says"
        )
    return recorded


def service_lease_key(group: str, partition: int = 0) -> str:
    """Partition 0's lease is the service's lease of old (one partition: nothing changes)."""
    suffix = f"#{partition}" if partition else ""
    return f"{topics.KEY_PREFIX}:owner:{group}{suffix}"


class OwnerLease:
    """One owner for all of a service's ordered groups: ``SET NX PX`` on the service's lease key,
    renewed at a third of its life, plus a fence key per ordered topic (in that topic's cluster
    slot) holding the same token, which the acknowledgement script checks. A replica whose lease
    was taken can no longer acknowledge: the new owner overwrote the fence keys first thing."""

    def __init__(self, client: aioredis.Redis, group: str, topics_: list[str], consumer: str, ttl_ms: int,
                 partition: int = 0) -> None:
        self.client = client
        self.partition = partition
        self.key = service_lease_key(group, partition)
        self.fences = [lease_key(t, group, partition if t in topics.PARTITIONED else 0) for t in topics_]
        self.consumer = consumer
        self.ttl_ms = ttl_ms
        self.token: str | None = None
        self.valid_until = 0.0
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._fence = client.register_script(_FENCE)

    def held(self) -> bool:
        return self.token is not None and time.monotonic() < self.valid_until

    def _deadline(self, t0: float) -> float:
        # The server's clock runs the lease; stop trusting ours a little before it can expire.
        return t0 + self.ttl_ms * 0.8 / 1000

    async def try_acquire(self) -> bool:
        token = f"{self.consumer}:{uuid.uuid4().hex[:12]}"
        t0 = time.monotonic()
        if not await self.client.set(self.key, token, nx=True, px=self.ttl_ms):
            return False
        for fence in self.fences:  # take every group over from a previous owner, zombie or not
            await self._fence(keys=[fence], args=[token, self.ttl_ms * 2, "1"])
        self.token, self.valid_until = token, self._deadline(t0)
        return True

    async def renew(self) -> bool:
        """Extend the lease; False when it is no longer ours (another replica took it)."""
        if self.token is None:
            return False
        t0 = time.monotonic()
        if await self._renew(keys=[self.key], args=[self.token, self.ttl_ms]):
            for fence in self.fences:
                if not await self._fence(keys=[fence], args=[self.token, self.ttl_ms * 2, "0"]):
                    self.token = None
                    return False
            self.valid_until = self._deadline(t0)
            return True
        self.token = None
        return False

    async def release(self) -> None:
        token, self.token = self.token, None
        if token is not None:
            await self._release(keys=[self.key], args=[token])
            for fence in self.fences:
                await self._release(keys=[fence], args=[token])

    async def holder(self) -> str | None:
        raw = await self.client.get(self.key)
        return _s(raw).rsplit(":", 1)[0] if raw is not None else None


async def remove_stale_consumers(client: aioredis.Redis, topic: str, group: str, me: str, idle_ms: int,
                                 partition: int = 0) -> list[str]:
    """``XGROUP DELCONSUMER`` every other consumer idle longer than ``idle_ms`` with nothing
    pending (what a dead consumer held is claimed first: by the ordered owner at takeover, by a
    competing replica's reclaimer). Returns the names removed."""
    key = topics.stream_key(topic, partition)
    removed = []
    for c in await client.xinfo_consumers(key, group):
        name = _s(c["name"])
        if name != me and int(c["pending"]) == 0 and int(c["idle"]) > idle_ms:
            await client.xgroup_delconsumer(key, group, name)
            removed.append(name)
    if removed:
        log.info("%s on %s: removed stale consumers %s", group, topic, ", ".join(removed))
    return removed


async def partitions_status(client: aioredis.Redis) -> tuple[int | None, list[tuple[str, str, int, int]]]:
    """The recorded partition count, and ``(stream, group, lag, pending)`` for every group on every
    stream of every partitioned topic under it (lag None from Redis 7 is reported as -1: unknown)."""
    raw = await client.get(topics.partitions_key())
    recorded = int(_s(raw)) if raw is not None else None
    rows = []
    for topic in sorted(topics.PARTITIONED):
        for key in topics.stream_keys(topic, recorded or 1):
            if not await client.exists(key):
                continue
            for g in await client.xinfo_groups(key):
                lag = g.get("lag")
                rows.append((key, _s(g["name"]), -1 if lag is None else int(lag), int(g["pending"])))
    return recorded, rows


async def set_partitions(client: aioredis.Redis, partitions: int) -> int | None:
    """Record a new partition count, refused (ValueError, one line) unless every group of every
    partitioned topic has consumed everything (lag 0) and holds nothing pending: a key's events
    then sit on one partition only, all handled, and the new count routes what comes next.
    Returns the count recorded before."""
    if partitions < 1:
        raise ValueError(f"the partition count must be >= 1, got {partitions}")
    recorded, rows = await partitions_status(client)
    busy = [f"{group} on {key}: lag {lag}, pending {pending}" for key, group, lag, pending in rows
            if lag != 0 or pending != 0]
    if busy:
        raise ValueError("refused: not every group has drained its partitions (stop the producers and wait): "
                         + "; ".join(busy))
    await client.set(topics.partitions_key(), partitions)
    return recorded
