"""The once-per-candle guard: a candle-keyed event is appended only if it is newer than the last
one appended for its (symbol, interval[, more]), in one atomic Lua step per call, for one event
or a whole batch.

The last open_time per stream lives in a hash beside the topic (same cluster slot), so the guard
survives restarts and is shared by replicas; re-deliveries, replays, replicas and a crash between
publish and ack never put a candle on a stream twice, nor behind a later one.

Every append trims its stream: ``MAXLEN ~ cap`` always, and with a retention ``MINID ~
(now - retention)`` too, so a stream holds at most the cap and at most that much time.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import redis.asyncio as aioredis

from libs.common import topics
from libs.common.bus.framing import DATA_FIELD
from libs.common.telemetry import ServiceMetrics

LAST_OPEN_TIME = "last-open-time"

# KEYS[1] stream, KEYS[2] last-open-time hash; ARGV: maxlen, data field, minid ('' for none), then
# (field, open_time, payload) per event, applied in order. Returns {flags, lasts}: flags holds '1'
# (appended) or '0' (refused) per event, lasts the stored open_time for each refused one, in order
# (an appended event's last is its own open_time). Compact because a batch is 1000 events: a
# reply of 1000 pairs cost more to parse than the appends.
#
# A batch holds many candles of few keys: each field's last is read once (HGET) and kept in a
# table, and the lasts that moved are written once at the end (HSET in chunks) instead of a
# HGET and a HSET per event (2 of the 3 calls per event, ~40% of the script's time). An XADD
# that fails (pcall) writes the lasts of everything appended before it, then fails the call,
# as the per-event HSETs did: what is on the stream always has its last recorded.
_PUBLISH_ONCE_MANY = """
local flags = {}
local lasts = {}
local known = {}
local moved = {}
local order = {}
local appended = false
local function record()
  local args = {}
  for _, f in ipairs(order) do
    args[#args + 1] = f
    args[#args + 1] = moved[f]
    if #args >= 400 then
      redis.call('HSET', KEYS[2], unpack(args))
      args = {}
    end
  end
  if #args > 0 then
    redis.call('HSET', KEYS[2], unpack(args))
  end
end
for i = 4, #ARGV, 3 do
  local f = ARGV[i]
  local last = known[f]
  if last == nil then
    local raw = redis.call('HGET', KEYS[2], f)
    last = false
    if raw then
      last = tonumber(raw)
      if last == nil then
        record()
        return redis.error_reply('last open time of ' .. f .. ' is not a number: ' .. raw)
      end
    end
    known[f] = last
  end
  local t = tonumber(ARGV[i + 1])
  if last and last >= t then
    flags[#flags + 1] = '0'
    lasts[#lasts + 1] = last
  else
    local r = redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', ARGV[2], ARGV[i + 2])
    if type(r) == 'table' and r.err then
      record()
      return r
    end
    if moved[f] == nil then
      order[#order + 1] = f
    end
    moved[f] = ARGV[i + 1]
    known[f] = t
    flags[#flags + 1] = '1'
    appended = true
  end
end
record()
if appended and ARGV[3] ~= '' then
  redis.call('XTRIM', KEYS[1], 'MINID', '~', ARGV[3])
end
return {table.concat(flags), lasts}
"""


def _replies(events: Sequence[Any], reply: Any) -> list[tuple[bool, int]]:
    flags, lasts = reply
    if isinstance(flags, str):  # a client made with decode_responses
        flags = flags.encode()
    refused = iter(lasts)
    return [(True, e.open_time) if f == 49 else (False, int(next(refused))) for e, f in zip(events, flags)]  # 49: b'1'


def candle_field(symbol: str, interval: str, *more: str) -> str:
    return "|".join((symbol, interval, *more))


class OncePerCandle:
    """Appends candle-keyed events to ``topic`` at most once per (symbol, interval, open_time).

    With ``metrics``, each publish counts ``events_out_total`` (appended) or ``duplicates_total``
    (refused) for the topic. ``retention_ms`` > 0 adds time-based trimming (``MINID ~``).
    """

    def __init__(
        self,
        client: aioredis.Redis,
        topic: str,
        maxlen: int,
        metrics: ServiceMetrics | None = None,
        *,
        retention_ms: int = 0,
        partitions: int = 1,
    ) -> None:
        self.client = client
        self.topic = topic
        # An unpartitioned topic is one stream whatever the deployment's count.
        self.partitions = partitions if topic in topics.PARTITIONED else 1
        self.maxlen = maxlen
        self.retention_ms = retention_ms
        self.metrics = metrics
        self._last_tried: dict[str, Any] = {}  # per stream field: the last event handed to publish
        self._unsent: list[tuple[Any, tuple[str, ...]]] = []  # tried in a call that failed
        self.stream = topics.stream_key(topic)
        self.last_key = topics.stream_companion_key(topic, LAST_OPEN_TIME)
        # Per partition: (stream, last-open-time hash), both in the partition's slot.
        self._keys = [[topics.stream_key(topic, p), topics.stream_companion_key(topic, LAST_OPEN_TIME, p)]
                      for p in range(self.partitions)]
        self._script_many = client.register_script(_PUBLISH_ONCE_MANY)

    def partition_of(self, event: Any) -> int:
        return topics.partition_of(event.symbol, event.interval, self.partitions)

    def _minid(self) -> str:
        if self.retention_ms <= 0:
            return ""
        return str(max(0, int(time.time() * 1000) - self.retention_ms))

    async def publish(self, event: Any, *key_more: str) -> tuple[bool, int]:
        """``(appended, last_open_time)``; the event must have symbol, interval and open_time.
        ``key_more`` widens the identity (e.g. the model name on predictions.v1)."""
        field = candle_field(event.symbol, event.interval, *key_more)
        self._last_tried[field] = event
        appended, last = await self._append(field, event)
        self._count(appended, 1)
        return appended, last

    async def _append(self, field: str, event: Any) -> tuple[bool, int]:
        reply = await self._script_many(
            keys=self._keys[self.partition_of(event)] if self.partitions > 1 else self._keys[0],
            args=[self.maxlen, DATA_FIELD, self._minid(), field, event.open_time, event.to_json()],
        )
        return _replies([event], reply)[0]

    async def retry_last(self, symbol: str, interval: str, open_time: int, *key_more: str) -> bool:
        """For a handler whose state took a candle before its publish failed: when the candle at
        ``open_time`` is the last event tried for this stream, publish it again (the guard keeps it
        once) and return True; otherwise False (a plain re-delivery: nothing to do)."""
        event = self._last_tried.get(candle_field(symbol, interval, *key_more))
        if event is None or event.open_time != open_time:
            return False
        await self.publish(event, *key_more)
        return True

    async def publish_many(self, events: Sequence[Any], *key_more: str) -> list[tuple[bool, int]]:
        """``publish`` for many events in one round trip: same guard, applied in the given
        order, one ``(appended, last_open_time)`` per event."""
        if not events:
            return []
        if self.partitions > 1:
            return await self._publish_partitioned(events, key_more)
        args: list[Any] = [self.maxlen, DATA_FIELD, self._minid()]
        for e in events:
            args += (candle_field(e.symbol, e.interval, *key_more), e.open_time, e.to_json())
        out = _replies(events, await self._script_many(keys=self._keys[0], args=args))
        self._count(sum(a for a, _ in out), len(out))
        return out

    async def _publish_partitioned(self, events: Sequence[Any], key_more: tuple[str, ...]) -> list[tuple[bool, int]]:
        # One script call per partition touched (a script's keys must share a cluster slot); each
        # key lives in one partition, so its events keep their order.
        by_partition: dict[int, list[int]] = {}
        for i, e in enumerate(events):
            by_partition.setdefault(self.partition_of(e), []).append(i)
        minid = self._minid()
        out: list[tuple[bool, int] | None] = [None] * len(events)
        appended = 0
        for p, idx in by_partition.items():
            part = [events[i] for i in idx]
            args: list[Any] = [self.maxlen, DATA_FIELD, minid]
            for e in part:
                args += (candle_field(e.symbol, e.interval, *key_more), e.open_time, e.to_json())
            replies = _replies(part, await self._script_many(keys=self._keys[p], args=args))
            for i, r in zip(idx, replies):
                out[i] = r
            # Counted per call: a later partition's failure must not un-count appends already made.
            n = sum(a for a, _ in replies)
            appended += n
            self._count(n, len(replies))
        return out  # type: ignore[return-value]

    async def publish_all(self, events: Sequence[Any], *key_more: str) -> int:
        """For consumers that retry a batch after a failed publish: publish whatever an earlier
        failed call left unsent, then ``events``, in one round trip per key identity. A failure
        keeps them all for the next call (the guard keeps each candle once). Returns how many
        were appended."""
        self._unsent += [(e, key_more) for e in events]
        appended = 0
        while self._unsent:
            more = self._unsent[0][1]
            batch = [e for e, m in self._unsent if m == more]
            appended += sum(a for a, _ in await self.publish_many(batch, *more))
            self._unsent = [(e, m) for e, m in self._unsent if m != more]
        return appended

    def _count(self, appended: int, total: int) -> None:
        if self.metrics is None:
            return
        if appended:
            self.metrics.events_out.labels(self.topic).inc(appended)
        if total - appended:
            self.metrics.duplicates.labels(self.topic).inc(total - appended)

    async def last_open_times(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for _, last_key in self._keys:
            self._merge_last(await self.client.hgetall(last_key), out)
        return out

    @staticmethod
    def _merge_last(raw: dict, out: dict[tuple[str, str], int]) -> None:
        for f, v in raw.items():
            symbol, interval = (f.decode() if isinstance(f, bytes) else f).split("|")[:2]
            out[(symbol, interval)] = max(int(v), out.get((symbol, interval), 0))
