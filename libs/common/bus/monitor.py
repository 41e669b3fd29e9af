"""Bus metrics with fixed names (one alert rule covers every service), and the per-group sampler:
lag, pending count, oldest pending age, entries trimmed before the group consumed them.

Names (labels ``service``, ``topic``, ``group`` as listed):

* ``klinebus_bus_consumed_total{service,topic}``: entries handed to handlers (dead letters excluded)
* ``klinebus_bus_consumer_stalled{service,topic,reason}``: 1 while a consumer waits out the
  infrastructure (reason: oom, readonly, loading, connection, timeout, nogroup, ...)
* ``klinebus_bus_consumer_up{service,topic}``: 1 while the consumer task runs (0: dead or stopped)
* ``klinebus_bus_owner{service,topic}``: 1 while this replica owns the ordered group, 0 on standby
* ``klinebus_bus_group_lag_entries{topic,group}``: entries not yet delivered to the group
* ``klinebus_bus_group_pending_entries{topic,group}``: delivered, not yet acknowledged
* ``klinebus_bus_group_oldest_pending_seconds{topic,group}``: age of the oldest pending entry
* ``klinebus_bus_trimmed_unconsumed_total{topic,group}``: entries the stream cap or retention
  removed before the group consumed them
* ``klinebus_bus_group_recreated_total{topic,group}``: consumer groups recreated after a loss
* ``klinebus_bus_stale_consumers_removed_total{topic,group}``
"""

from __future__ import annotations

import logging
import time

import redis.asyncio as aioredis
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from libs.common import topics
from libs.common.bus.framing import entry_id_key as id_key

log = logging.getLogger("klinebus.bus")

# Redis < 7 has no group lag: it is counted from the last delivered id, up to this many entries
# (beyond it, the stream length is the upper bound reported).
LAG_SCAN_CAP = 10_000


def _get_or_make(kind, name: str, doc: str, labels: list[str], registry: CollectorRegistry):
    lookup = name.removesuffix("_total") if kind is Counter else name
    existing = registry._names_to_collectors.get(lookup)  # one process may host several services
    return existing if existing is not None else kind(name, doc, labels, registry=registry)


class BusMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        m = lambda kind, name, doc, labels: _get_or_make(kind, f"klinebus_bus_{name}", doc, labels, registry)  # noqa: E731
        self.consumed = m(Counter, "consumed_total", "Entries handed to handlers", ["service", "topic"])
        self.stalled = m(Gauge, "consumer_stalled", "1 while a consumer waits out an infrastructure failure",
                         ["service", "topic", "reason"])
        self.up = m(Gauge, "consumer_up", "1 while the consumer task runs", ["service", "topic"])
        self.owner = m(Gauge, "owner", "1 while this replica owns the ordered group (0: hot standby)",
                       ["service", "topic"])
        self.lag = m(Gauge, "group_lag_entries", "Entries not yet delivered to the group", ["topic", "group"])
        self.pending = m(Gauge, "group_pending_entries", "Entries delivered but not acknowledged", ["topic", "group"])
        self.oldest_pending = m(Gauge, "group_oldest_pending_seconds", "Age of the oldest pending entry",
                                ["topic", "group"])
        self.trimmed = m(Counter, "trimmed_unconsumed_total",
                         "Entries trimmed from the stream before the group consumed them", ["topic", "group"])
        self.recreated = m(Counter, "group_recreated_total", "Consumer groups recreated after a loss", ["topic", "group"])
        self.stale_removed = m(Counter, "stale_consumers_removed_total", "Dead consumers removed from a group",
                               ["topic", "group"])


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class GroupSampler:
    """Samples one (topic, group) over the topic's partitions and sets the gauges: lag and
    pending summed, the oldest pending age the oldest of any partition (no partition label, so
    the dashboards and alert rules read a partitioned group as before); counts trims it can prove."""

    def __init__(self, metrics: BusMetrics, topic: str, group: str, partitions: int = 1) -> None:
        self.metrics, self.topic, self.group = metrics, topic, group
        self.keys = topics.stream_keys(topic, partitions)
        self.key = self.keys[0]
        self._trimmed_seen: dict[str, int] = {}  # Redis 7, per stream: (entries-added - read - length) counted
        self._warned_behind: dict[str, str] = {}

    async def sample(self, client: aioredis.Redis) -> dict:
        total: dict = {}
        for key in self.keys:
            one = await self._sample(client, key)
            if not one:
                continue
            if not total:
                total = dict(one)
                continue
            for k in ("lag", "pending", "length"):
                total[k] += one[k]
            total["oldest_pending_s"] = max(total["oldest_pending_s"], one["oldest_pending_s"])
        if total:
            self.metrics.lag.labels(self.topic, self.group).set(total["lag"])
            self.metrics.pending.labels(self.topic, self.group).set(total["pending"])
            self.metrics.oldest_pending.labels(self.topic, self.group).set(total["oldest_pending_s"])
        return total

    async def _sample(self, client: aioredis.Redis, key: str) -> dict:
        groups = {_s(g["name"]): g for g in await client.xinfo_groups(key)}
        g = groups.get(self.group)
        if g is None:
            return {}
        info = await client.xinfo_stream(key)
        length = int(info["length"])
        last_delivered = _s(g["last-delivered-id"])
        first = info.get("first-entry")
        first_id = _s(first[0]) if first else None
        if g.get("lag") is not None:  # Redis 7+
            lag = int(g["lag"])
        else:
            more = await client.xrange(key, min="(" + last_delivered, count=LAG_SCAN_CAP + 1)
            lag = len(more) if len(more) <= LAG_SCAN_CAP else length
        pending = int(g["pending"])
        oldest = 0.0
        if pending:
            summary = await client.xpending(key, self.group)
            low = summary.get("min")
            if low:
                oldest = max(0.0, time.time() - id_key(low)[0] / 1000)
        self._trims(key, info, g, length, last_delivered, first_id)
        return {"lag": lag, "pending": pending, "oldest_pending_s": oldest, "length": length}

    def _trims(self, key: str, info, g, length: int, last_delivered: str, first_id: str | None) -> None:
        added, read = info.get("entries-added"), g.get("entries-read")
        if added is not None and read is not None and g.get("lag") is None:
            # Redis 7 cannot tell the lag just now (it says nil, e.g. while entries were deleted
            # between the group's position and the end): nothing is proven trimmed this round.
            return
        if added is not None and read is not None:  # Redis 7+: exact
            never_read = int(added) - int(read) - int(g["lag"])
            seen = self._trimmed_seen.get(key, 0)
            if never_read > seen:
                delta = never_read - seen
                self.metrics.trimmed.labels(self.topic, self.group).inc(delta)
                log.error("%s on %s: %d entries were trimmed before the group read them (up to %s)",
                          self.group, self.topic, delta, _s(info.get("first-entry", ["?"])[0]))
            self._trimmed_seen[key] = max(seen, never_read)
            return
        # Redis 6.2 cannot count them: the group's position behind the stream's first entry is the
        # sign (the entries between were trimmed unless there were none). One line per episode;
        # the exact count is added when the consumer meets them (pending entries without data).
        if first_id is not None and id_key(last_delivered) < id_key(first_id) and last_delivered != "0-0":
            if self._warned_behind.get(key) != first_id:
                log.error("%s on %s: the group last read %s but the stream now starts at %s: entries in "
                          "between were trimmed before it read them (raise stream_maxlen / retention)",
                          self.group, self.topic, last_delivered, first_id)
                self._warned_behind[key] = first_id
