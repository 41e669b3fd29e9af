"""Redis over TLS, for real: Debian's redis-server (built with TLS) with a CA made at test time,
the generated ACL users on it, and the settings a deployment uses (``rediss://`` +
KLINEBUS_REDIS_TLS_CA, and KLINEBUS_REDIS_TLS_CERT/KEY when Redis asks for client certificates)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
import redis.exceptions as rex

from libs.common import acl, topics
from libs.common.bus import Bus
from libs.common.contracts import EVENT_TYPES
from libs.common.settings import ServiceSettings, SettingsError, load_settings
from libs.common.telemetry import ServiceMetrics
from tests.fuzz.samples import SAMPLES
from tests.libs.common.test_acl import ADMIN, PASSWORDS, _registry, redis7

pytestmark = pytest.mark.skipif(
    redis7() is None or shutil.which("openssl") is None, reason="needs redis-server >= 7 (with TLS) and openssl"
)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(folder: Path) -> None:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, all signed by the CA."""
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=klinebus test CA",
             cwd=folder)
    for name, ext in (("server", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
                      ("client", "extendedKeyUsage=clientAuth")):
        (folder / f"{name}.ext").write_text(ext + "\n")
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=klinebus-{name}", cwd=folder)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=folder)
    # Another CA that signed nothing here: trusting it must not be enough.
    _openssl("req", "-x509", *ec, "-keyout", "other.key", "-out", "other.crt", "-days", "2", "-subj", "/CN=other CA",
             cwd=folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TlsRedis:
    def __init__(self, folder: Path, auth_clients: str) -> None:
        make_pki(folder)
        (folder / "users.acl").write_text(acl.acl_file(PASSWORDS, ADMIN))
        self.folder, self.port = folder, free_port()
        self.proc = subprocess.Popen(
            [redis7(), "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
             "--tls-cert-file", "server.crt", "--tls-key-file", "server.key", "--tls-ca-cert-file", "ca.crt",
             "--tls-auth-clients", auth_clients, "--aclfile", "users.acl", "--save", "", "--appendonly", "no"],
            cwd=folder, stdout=open(folder / "redis.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis.from_url(self.url("admin") + self.files(cert=True)).ping()
                return
            except (rex.ConnectionError, rex.AuthenticationError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError((folder / "redis.log").read_text()) from None
                time.sleep(0.05)

    def url(self, service: str) -> str:
        user, pw = (acl.ADMIN_USER, ADMIN) if service == "admin" else (acl.user_name(service), PASSWORDS[service])
        return f"rediss://{user}:{pw}@localhost:{self.port}/0"

    def files(self, cert: bool = False) -> str:
        q = f"?ssl_ca_certs={self.folder / 'ca.crt'}"
        if cert:
            q += f"&ssl_certfile={self.folder / 'client.crt'}&ssl_keyfile={self.folder / 'client.key'}"
        return q

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def tls_redis(tmp_path):
    server = TlsRedis(tmp_path, "optional")
    yield server
    server.stop()


@pytest.fixture
def mtls_redis(tmp_path):
    server = TlsRedis(tmp_path, "yes")
    yield server
    server.stop()


def settings_for(monkeypatch, url: str, **files: Path) -> ServiceSettings:
    monkeypatch.setenv("KLINEBUS_REDIS_URL", url)
    for name, path in files.items():
        monkeypatch.setenv(f"KLINEBUS_REDIS_TLS_{name.upper()}", str(path))
    return load_settings(ServiceSettings)


async def test_a_service_runs_its_bus_over_tls_as_its_acl_user(tls_redis, monkeypatch):
    """features' user, rediss:// and the CA from KLINEBUS_REDIS_TLS_CA: it consumes klines.v1
    through its group (fenced reads, acknowledgements, lease) and publishes features.v1."""
    s = settings_for(monkeypatch, tls_redis.url("features"), ca=tls_redis.folder / "ca.crt")
    assert s.redis_url.startswith("rediss://") and "ssl_ca_certs=" in s.redis_url
    admin = aioredis.Redis.from_url(tls_redis.url("admin") + tls_redis.files())
    kline = EVENT_TYPES[topics.KLINES].model_validate(SAMPLES[topics.KLINES])
    await admin.xadd(topics.stream_key(topics.KLINES), {"__data__": kline.to_json()})
    bus = Bus("features", s.redis_url, consumer="features-1", metrics=ServiceMetrics("features", _registry()))
    bus.publisher(topics.FEATURES, EVENT_TYPES[topics.FEATURES])
    got = []

    async def on_klines(ev, entry_id):
        got.append(ev)
        await bus.publish(EVENT_TYPES[topics.FEATURES].model_validate(SAMPLES[topics.FEATURES]))

    bus.ordered(topics.KLINES, EVENT_TYPES[topics.KLINES])(on_klines)
    await asyncio.wait_for(bus.start(), 60)
    try:
        deadline = time.monotonic() + 60
        while await admin.xlen(topics.stream_key(topics.FEATURES)) < 1:
            assert time.monotonic() < deadline and bus.alive(), bus.fatal
            await asyncio.sleep(0.05)
        assert got == [kline]
        info = await admin.client_list()
        assert any(c.get("user") == "klinebus-features" for c in info)
    finally:
        await bus.stop()
        await admin.aclose()


def test_a_server_signed_by_another_ca_is_not_trusted(tls_redis):
    url = tls_redis.url("features") + f"?ssl_ca_certs={tls_redis.folder / 'other.crt'}"
    with pytest.raises(rex.ConnectionError, match="certificate verify failed"):
        redis.Redis.from_url(url).ping()


def test_plain_redis_is_refused_by_a_tls_only_server(tls_redis):
    with pytest.raises(rex.ConnectionError):
        redis.Redis.from_url(tls_redis.url("features").replace("rediss://", "redis://"), socket_timeout=5).ping()


def test_client_certificates_when_redis_asks_for_them(mtls_redis, monkeypatch):
    without = settings_for(monkeypatch, mtls_redis.url("features"), ca=mtls_redis.folder / "ca.crt")
    with pytest.raises(rex.ConnectionError):
        redis.Redis.from_url(without.redis_url).ping()
    s = settings_for(monkeypatch, mtls_redis.url("features"), ca=mtls_redis.folder / "ca.crt",
                     cert=mtls_redis.folder / "client.crt", key=mtls_redis.folder / "client.key")
    c = redis.Redis.from_url(s.redis_url)
    assert c.acl_whoami() == "klinebus-features"
    c.close()


def test_tls_files_with_a_plain_url_are_one_error(monkeypatch, tmp_path):
    monkeypatch.setenv("KLINEBUS_REDIS_URL", "redis://klinebus-features:pw@localhost:6379/0")
    monkeypatch.setenv("KLINEBUS_REDIS_TLS_CA", str(tmp_path / "ca.crt"))
    with pytest.raises(SettingsError, match="rediss://") as refused:
        load_settings(ServiceSettings)
    assert "pw@" not in str(refused.value)


def test_klinebus_tail_reads_over_tls_as_the_operator(tls_redis):
    import os
    import sys

    admin = redis.Redis.from_url(tls_redis.url("admin") + tls_redis.files())
    admin.xadd(topics.stream_key(topics.KLINES), {"__data__": EVENT_TYPES[topics.KLINES].model_validate(SAMPLES[topics.KLINES]).to_json()})
    admin.close()
    env = {**os.environ, "KLINEBUS_REDIS_URL": tls_redis.url("operator"), "KLINEBUS_REDIS_TLS_CA": str(tls_redis.folder / "ca.crt")}
    out = subprocess.run([sys.executable, "-m", "klinebus", "tail", "klines.v1"], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[3], timeout=120)
    assert out.returncode == 0, out.stderr
    assert '"symbol":"BTCUSDT"' in out.stdout
    assert PASSWORDS["operator"] not in out.stdout + out.stderr
