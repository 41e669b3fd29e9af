"""Operator helpers: look at what is on a topic without joining a consumer group."""

from __future__ import annotations

import os

import orjson
import redis

from libs.common import topics
from libs.common.errors import CliError


def tail(topic: str, count: int, redis_url: str | None) -> None:
    url = redis_url or os.environ.get("KLINEBUS_REDIS_URL")
    if not url:
        raise CliError("tail needs --redis-url or KLINEBUS_REDIS_URL (the embedded Redis lives only as long as its service)")
    if topic not in topics.ALL_TOPICS:
        raise CliError(f"unknown topic {topic!r}; topics: {', '.join(topics.ALL_TOPICS)}")
    client = redis.Redis.from_url(url)
    try:
        entries = client.xrevrange(topics.stream_key(topic), count=count)
        for entry_id, fields in reversed(entries):
            event = orjson.loads(fields[b"__data__"])
            print(entry_id.decode(), orjson.dumps(event).decode())
    finally:
        client.close()
