"""Charts waiting for the model, in Redis: the latest chart per (symbol, interval) wins.

A chart is acknowledged on charts.v1 as soon as it is recorded here, so a slow model never
holds the stream back, and a newer chart of the same symbol and interval replaces an older
one still waiting (the older one is counted as skipped, never analysed late). Records live in
Redis, not in the process, so a kill loses nothing: a restarted or surviving replica finds
them. A replica takes a chart with a lease (SET NX PX), so two replicas do not analyse the
same one; a lease left by a killed replica expires and the chart is taken again. The
analyses.v1 once-per-candle guard keeps a chart analysed twice from being published twice.
"""

from __future__ import annotations

from typing import Any

from libs.common import topics

# KEYS: charts hash, open-time hash; ARGV: field, open_time, chart json.
# Returns {1, replaced open_time or -1} when recorded, {0, waiting open_time} when not newer.
_OFFER = """
local cur = redis.call('HGET', KEYS[2], ARGV[1])
if cur and tonumber(cur) >= tonumber(ARGV[2]) then
  return {0, tonumber(cur)}
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
if cur then return {1, tonumber(cur)} end
return {1, -1}
"""
# KEYS: charts hash, open-time hash, lease key; ARGV: field, open_time. Removes the record
# only if it is still that chart (a newer one may have replaced it meanwhile).
_DONE = """
redis.call('DEL', KEYS[3])
if redis.call('HGET', KEYS[2], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
  return 1
end
return 0
"""


def field_of(symbol: str, interval: str) -> str:
    return f"{symbol}|{interval}"


class PendingCharts:
    def __init__(self, client: Any, group: str) -> None:
        self.client = client
        self.charts = topics.stream_companion_key(topics.CHARTS, f"{group}:pending")
        self.open_times = topics.stream_companion_key(topics.CHARTS, f"{group}:pending-open-time")
        self._lease_prefix = topics.stream_companion_key(topics.CHARTS, f"{group}:lease")
        self._offer = client.register_script(_OFFER)
        self._done = client.register_script(_DONE)

    def lease_key(self, field: str, open_time: int) -> str:
        return f"{self._lease_prefix}:{field}|{open_time}"

    async def offer(self, symbol: str, interval: str, open_time: int, chart_json: bytes) -> tuple[bool, int | None]:
        """(recorded, the open time it replaced or refused against, if any)."""
        ok, other = await self._offer(keys=[self.charts, self.open_times], args=[field_of(symbol, interval), open_time, chart_json])
        return bool(ok), (None if int(other) < 0 else int(other))

    async def waiting(self) -> list[tuple[str, int]]:
        """(field, open_time) of every waiting chart, oldest candle first."""
        raw = await self.client.hgetall(self.open_times)
        items = [((f.decode() if isinstance(f, bytes) else f), int(v)) for f, v in raw.items()]
        return sorted(items, key=lambda kv: (kv[1], kv[0]))

    async def take(self, field: str, open_time: int, owner: str, lease_ms: int) -> bytes | None:
        """The chart's JSON if this replica got its lease and it is still the one waiting."""
        if not await self.client.set(self.lease_key(field, open_time), owner, nx=True, px=lease_ms):
            return None
        current = await self.client.hget(self.open_times, field)
        raw = await self.client.hget(self.charts, field)
        if current is None or int(current) != open_time or raw is None:
            await self.client.delete(self.lease_key(field, open_time))
            return None
        return raw

    async def release(self, field: str, open_time: int) -> None:
        """Give the chart back (the backend is down): it waits for the next try."""
        await self.client.delete(self.lease_key(field, open_time))

    async def release_owned(self, owner: str) -> int:
        """At start: give back the leases this consumer name held when it stopped (a killed
        pod restarted under the same name need not wait for them to expire)."""
        n = 0
        for field, open_time in await self.waiting():
            key = self.lease_key(field, open_time)
            holder = await self.client.get(key)
            if holder is not None and (holder.decode() if isinstance(holder, bytes) else holder) == owner:
                n += await self.client.delete(key)
        return n

    async def done(self, field: str, open_time: int) -> bool:
        return bool(await self._done(keys=[self.charts, self.open_times, self.lease_key(field, open_time)], args=[field, open_time]))

    async def count(self) -> int:
        return int(await self.client.hlen(self.open_times))
