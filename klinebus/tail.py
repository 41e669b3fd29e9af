"""Operator helpers: look at what is on a topic without joining a consumer group."""

from __future__ import annotations

import orjson
import redis

from libs.common import topics
from libs.common.bus.framing import entry_id_key
from libs.common.errors import CliError
from libs.common.redact import redact, redact_url, register


def tail(topic: str, count: int, redis_url: str | None) -> None:
    from libs.common.settings import EMBEDDED_REDIS, ServiceSettings, load_settings

    # Through the settings: the URL is checked (one line, no password), KLINEBUS_REDIS_TLS_* apply.
    url = load_settings(ServiceSettings, **({"redis_url": redis_url} if redis_url else {})).redis_url
    if not url or url == EMBEDDED_REDIS:
        raise CliError("tail needs --redis-url or KLINEBUS_REDIS_URL (the embedded Redis lives only as long as its service)")
    if topic not in topics.ALL_TOPICS:
        raise CliError(f"unknown topic {topic!r}; topics: {', '.join(topics.ALL_TOPICS)}")
    register(url)  # its password never printed, even inside an event
    client = redis.Redis.from_url(url)
    try:
        try:
            # every partition of a partitioned topic (the count recorded in Redis): the newest
            # ``count`` over all of them, by entry id (their clocks are the one server's)
            recorded = client.get(topics.partitions_key())
            keys = topics.stream_keys(topic, int(recorded) if recorded is not None else 1)
            entries = [e for key in keys for e in client.xrevrange(key, count=count)]
        except redis.RedisError as exc:
            raise CliError(redact(f"tail {topic} on {redact_url(url)}: {type(exc).__name__}: {exc}")) from None
        entries = sorted(entries, key=lambda e: entry_id_key(e[0].decode()), reverse=True)[:count]
        for entry_id, fields in reversed(entries):
            raw = fields.get(b"__data__", b"")
            try:
                line = orjson.dumps(orjson.loads(raw)).decode()
            except orjson.JSONDecodeError:
                line = raw.decode("utf-8", errors="replace")[:4096]
            print(entry_id.decode(), redact(line))
    finally:
        client.close()
