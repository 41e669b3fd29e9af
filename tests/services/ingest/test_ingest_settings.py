"""Ingest settings that cannot work are refused at load time with one clear line."""

from __future__ import annotations

import pytest

from libs.common.settings import SettingsError, load_settings
from services.ingest.settings import IngestSettings


@pytest.mark.parametrize(
    ("env", "var", "words"),
    [
        ({"KLINEBUS_RECONNECT_INITIAL_S": "5", "KLINEBUS_RECONNECT_MAX_S": "2"}, "KLINEBUS_RECONNECT_MAX_S", "KLINEBUS_RECONNECT_INITIAL_S (5)"),
        ({"KLINEBUS_ROTATE_AFTER_S": "86400"}, "KLINEBUS_ROTATE_AFTER_S", "24 h"),
        ({"KLINEBUS_ROTATE_AFTER_S": "90000"}, "KLINEBUS_ROTATE_AFTER_S", "below 86400"),
        ({"KLINEBUS_STREAMS_PER_CONNECTION": "1025"}, "KLINEBUS_STREAMS_PER_CONNECTION", "at most 1024"),
    ],
)  # fmt: skip
def test_impossible_connection_settings_fail_with_one_line(monkeypatch, env, var, words):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as err:
        load_settings(IngestSettings)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"invalid setting {var}: ")
    assert words in message


def test_the_limits_themselves_are_accepted(monkeypatch):
    monkeypatch.setenv("KLINEBUS_RECONNECT_INITIAL_S", "2")
    monkeypatch.setenv("KLINEBUS_RECONNECT_MAX_S", "2")
    monkeypatch.setenv("KLINEBUS_ROTATE_AFTER_S", "86399")
    monkeypatch.setenv("KLINEBUS_STREAMS_PER_CONNECTION", "1024")
    s = load_settings(IngestSettings)
    assert (s.reconnect_initial_s, s.reconnect_max_s, s.rotate_after_s, s.streams_per_connection) == (2, 2, 86399, 1024)


# Copied from seeds/004 "Supported Cryptocurrencies (25 coins)", in its order.
SEED_COINS = [
    "BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT",
    "ADAUSDT", "AVAXUSDT", "DOGEUSDT", "LINKUSDT", "MATICUSDT",
    "LTCUSDT", "UNIUSDT", "ATOMUSDT", "XMRUSDT", "NEARUSDT",
    "ARBUSDT", "OPUSDT", "APTUSDT", "SUIUSDT", "PEPEUSDT",
    "SHIBUSDT", "ICPUSDT", "ETCUSDT", "FILUSDT", "AAVEUSDT",
]  # fmt: skip


# Pairs Binance no longer trades, and what stands in for them.
REPLACED = {"MATICUSDT": "POLUSDT", "XMRUSDT": "DOTUSDT"}


def test_default_symbols_are_the_25_seed_coins_with_tradable_replacements(monkeypatch):
    monkeypatch.delenv("KLINEBUS_SYMBOLS", raising=False)
    expected = [REPLACED.get(s, s) for s in SEED_COINS]
    assert len(expected) == 25
    assert load_settings(IngestSettings).symbols == expected
