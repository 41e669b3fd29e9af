import subprocess
import sys

import pytest

from libs.common.settings import ServiceSettings, SettingsError, load_settings


def test_defaults_need_no_environment(monkeypatch):
    monkeypatch.delenv("KLINEBUS_REDIS_URL", raising=False)
    s = load_settings(ServiceSettings)
    assert s.redis_url is None  # -> embedded redis
    assert s.stream_maxlen > 0


@pytest.mark.parametrize(
    "var, value, needle",
    [
        ("KLINEBUS_REDIS_URL", "nonsense", "KLINEBUS_REDIS_URL: must be a URL with scheme"),
        ("KLINEBUS_REDIS_URL", "redis://", "KLINEBUS_REDIS_URL: has no host"),
        ("KLINEBUS_HTTP_PORT", "70000", "KLINEBUS_HTTP_PORT: Input should be less than or equal to 65535"),
        ("KLINEBUS_LOG_LEVEL", "loud", "KLINEBUS_LOG_LEVEL: must be DEBUG"),
        ("KLINEBUS_STREAM_MAXLEN", "-1", "KLINEBUS_STREAM_MAXLEN"),
    ],
)
def test_a_wrong_value_is_one_line_naming_the_variable(monkeypatch, var, value, needle):
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError) as err:
        load_settings(ServiceSettings)
    text = str(err.value)
    assert needle in text
    assert "\n" not in text


def test_cluster_and_tls_urls_are_accepted(monkeypatch):
    for url in ("redis+cluster://redis-0.redis:6379", "rediss://user:pw@redis.example:6380/1", "unix:///run/redis.sock"):
        monkeypatch.setenv("KLINEBUS_REDIS_URL", url)
        assert load_settings(ServiceSettings).redis_url == url


def test_service_fails_fast_with_one_line_on_a_wrong_setting(tmp_path):
    env = {"KLINEBUS_REDIS_URL": "nonsense", "PATH": "/usr/bin:/bin", "KLINEBUS_DATA_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "klinebus.cli", "run", "inference"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [
        "klinebus: error: invalid setting KLINEBUS_REDIS_URL: must be a URL with scheme "
        "redis/rediss/unix/redis+cluster/rediss+cluster, got 'nonsense'"
    ]


@pytest.mark.parametrize("raw, want", [("BTCUSDT, ethusdt", ["BTCUSDT", "ETHUSDT"]), ('["BTCUSDT", "ethusdt"]', ["BTCUSDT", "ETHUSDT"])])
def test_list_settings_take_a_comma_list_or_a_json_list(monkeypatch, raw, want):
    from services.ingest.settings import IngestSettings

    monkeypatch.setenv("KLINEBUS_SYMBOLS", raw)
    assert load_settings(IngestSettings).symbols == want


def test_a_malformed_json_list_is_one_line_naming_the_variable(monkeypatch):
    from services.ingest.settings import IngestSettings

    monkeypatch.setenv("KLINEBUS_SYMBOLS", '["BTCUSDT", ')
    with pytest.raises(SettingsError) as err:
        load_settings(IngestSettings)
    assert str(err.value).startswith("invalid setting KLINEBUS_SYMBOLS:") and "\n" not in str(err.value)
