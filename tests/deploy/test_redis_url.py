"""A service runs against the Redis it is given, checked at start; the embedded one only when asked.

An unset or empty KLINEBUS_REDIS_URL is one error line at start (a Secret key that did not resolve
must not bring replicas up on private Redises); KLINEBUS_REDIS_URL=embedded starts one; a Redis
with an eviction policy is refused, one without persistence is warned about, and one that cannot
tell (CONFIG not allowed) or is not reachable yet gets one line saying it was not checked.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from libs.common.redis_server import RedisSetupError, redis_url_for
from libs.common.settings import ServiceSettings, load_settings

REPO = Path(__file__).resolve().parents[2]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KLINEBUS_")}
    return {**env, "KLINEBUS_DATA_DIR": str(tmp_path), "KLINEBUS_HTTP_HOST": "127.0.0.1", **extra}


@pytest.mark.parametrize("value", [None, "", "  "])
def test_a_missing_or_empty_url_is_one_error_line_and_no_private_redis(tmp_path, value):
    env = _env(tmp_path)
    if value is not None:
        env["KLINEBUS_REDIS_URL"] = value
    proc = subprocess.run([sys.executable, "-m", "klinebus", "run", "alerts"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("klinebus: error: KLINEBUS_REDIS_URL is not set"), proc.stderr
    assert "'embedded'" in lines[0]
    assert not (tmp_path / "redis").exists()  # no redis-server was started


def test_embedded_is_an_explicit_opt_in_and_starts_a_real_server(tmp_path, monkeypatch):
    monkeypatch.setenv("KLINEBUS_REDIS_URL", "Embedded")
    settings = load_settings(ServiceSettings, data_dir=tmp_path)
    assert settings.redis_url == "embedded"
    with redis_url_for(settings) as url:
        client = redis.Redis.from_url(url)
        assert client.ping()
        client.close()
    assert (tmp_path / "redis" / "redis.conf").exists()


def _settings(url: str) -> ServiceSettings:
    return ServiceSettings(redis_url=url)


@pytest.fixture
def admin(redis_url):
    """The test Redis, its configuration restored afterwards."""
    client = redis.Redis.from_url(redis_url)
    saved = {k: client.config_get(k)[k] for k in ("maxmemory-policy", "save", "appendonly")}
    yield client
    for k, v in saved.items():
        if client.config_get(k)[k] != v:
            client.config_set(k, v)
    client.close()


def test_an_eviction_policy_is_refused_and_says_why(redis_url, admin):
    admin.config_set("maxmemory-policy", "allkeys-lru")
    with pytest.raises(RedisSetupError) as err:
        with redis_url_for(_settings(redis_url)):
            pass
    msg = str(err.value)
    assert "maxmemory-policy is allkeys-lru, not noeviction" in msg and "evict stream entries" in msg
    assert "\n" not in msg


def test_no_persistence_is_a_warning_and_persistence_passes(redis_url, admin, caplog):
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("appendonly", "no")
    admin.config_set("save", "")
    with caplog.at_level(logging.INFO, logger="klinebus.redis"):
        with redis_url_for(_settings(redis_url)) as url:
            assert url == redis_url
    assert [r.levelname for r in caplog.records if "persistence is off" in r.getMessage()] == ["WARNING"]
    caplog.clear()
    admin.config_set("save", "3600 1")
    with caplog.at_level(logging.INFO, logger="klinebus.redis"):
        with redis_url_for(_settings(redis_url)):
            pass
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("noeviction, persistence on" in r.getMessage() for r in caplog.records)


def test_a_user_without_config_gets_one_line_saying_it_was_not_checked(redis_url, admin, caplog):
    admin.execute_command("ACL", "SETUSER", "kb-nocfg", "on", ">kb-nocfg-pw", "~*", "&*", "+@all", "-config")
    try:
        limited = redis_url.replace("redis://", "redis://kb-nocfg:kb-nocfg-pw@", 1)
        with caplog.at_level(logging.INFO, logger="klinebus.redis"):
            with redis_url_for(_settings(limited)) as url:
                assert url == limited
    finally:
        admin.execute_command("ACL", "DELUSER", "kb-nocfg")
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "could not check the configuration of Redis" in line and "noeviction" in line
    assert "kb-nocfg-pw" not in line


def test_an_unreachable_redis_is_one_line_and_the_service_goes_on_to_retry(caplog):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    with caplog.at_level(logging.INFO, logger="klinebus.redis"):
        with redis_url_for(_settings(f"redis://:secret-pw@127.0.0.1:{port}/0")) as url:
            assert url.endswith(f"{port}/0")
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert f"127.0.0.1:{port}" in line and "could not check" in line and "secret-pw" not in line


def test_a_cluster_is_checked_on_every_primary(redis_cluster_url, caplog):
    from redis.cluster import RedisCluster

    cluster = RedisCluster.from_url(redis_cluster_url.replace("+cluster://", "://", 1))
    one = cluster.get_primaries()[-1]
    try:
        with caplog.at_level(logging.INFO, logger="klinebus.redis"):
            with redis_url_for(_settings(redis_cluster_url)):
                pass  # noeviction everywhere (persistence off on these nodes: a warning)
        assert any("persistence is off" in r.getMessage() for r in caplog.records)
        cluster.config_set("maxmemory-policy", "volatile-lru", target_nodes=one)
        with pytest.raises(RedisSetupError, match="maxmemory-policy is volatile-lru, not noeviction"):
            with redis_url_for(_settings(redis_cluster_url)):
                pass
    finally:
        cluster.config_set("maxmemory-policy", "noeviction", target_nodes=one)
        cluster.close()
