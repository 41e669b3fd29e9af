import os
import signal
import subprocess
import sys
import textwrap
import time

import redis

from libs.common.redis_server import EmbeddedRedis


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/status") as fh:
            return "zombie" not in fh.read().lower()
    except OSError:
        return False


def test_persists_across_restarts(tmp_path):
    with EmbeddedRedis(tmp_path) as server:
        r = redis.Redis.from_url(server.url)
        for i in range(100):
            r.xadd("s", {"i": i})
        r.close()
    with EmbeddedRedis(tmp_path) as server:
        r = redis.Redis.from_url(server.url)
        assert r.xlen("s") == 100
        r.close()


def test_stop_leaves_no_process(tmp_path):
    server = EmbeddedRedis(tmp_path, persistent=False).start()
    pid = server.process.pid
    server.stop()
    assert not _alive(pid)


def _host_script(folder) -> str:
    return textwrap.dedent(
        f"""
        import sys, time
        from libs.common.redis_server import EmbeddedRedis
        s = EmbeddedRedis({str(folder)!r}).start()
        print(s.process.pid, flush=True)
        time.sleep(120)
        """
    )


def test_server_dies_with_a_host_killed_by_sigterm_or_sigkill(tmp_path):
    for sig in (signal.SIGTERM, signal.SIGKILL):
        host = subprocess.Popen([sys.executable, "-c", _host_script(tmp_path / sig.name)], stdout=subprocess.PIPE, text=True)
        pid = int(host.stdout.readline())
        assert _alive(pid)
        host.send_signal(sig)
        host.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), f"redis-server outlived a host killed with {sig.name}"


def test_an_orphan_from_an_older_run_is_stopped_before_starting(tmp_path):
    # Simulate an orphan: a server started outside our control on the same folder.
    first = EmbeddedRedis(tmp_path).start()
    orphan_pid = first.process.pid
    first.process = None  # forget it, as a crashed host would...
    first._lock.close()  # ...whose lock died with it
    second = EmbeddedRedis(tmp_path).start()
    try:
        time.sleep(0.2)
        assert not _alive(orphan_pid)
        assert redis.Redis.from_url(second.url).ping()
    finally:
        second.stop()


def test_a_second_owner_is_refused_and_the_first_server_keeps_running(tmp_path):
    import pytest

    from libs.common.redis_server import EmbeddedRedisError

    with EmbeddedRedis(tmp_path) as first:
        with pytest.raises(EmbeddedRedisError, match="another klinebus process runs the embedded Redis"):
            EmbeddedRedis(tmp_path).start()
        assert redis.Redis.from_url(first.url).ping()


def test_a_server_killed_without_shutdown_loses_no_acknowledged_write(tmp_path):
    server = EmbeddedRedis(tmp_path).start()
    r = redis.Redis.from_url(server.url)
    for i in range(200):
        r.xadd("s", {"i": i})
    r.close()
    server.process.kill()  # SIGKILL: no SHUTDOWN, no final save
    server.process.wait()
    server.process = None
    server._lock.close()
    server._lock = None
    with EmbeddedRedis(tmp_path) as again:
        r = redis.Redis.from_url(again.url)
        assert r.xlen("s") == 200
        r.close()
