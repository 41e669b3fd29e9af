"""ChartsSettings from the environment, as k8s/compose set it for every service."""

from __future__ import annotations

import pytest

from libs.common.settings import SettingsError, load_settings
from services.charts.settings import ChartsSettings


def test_symbols_from_comma_list(monkeypatch):
    monkeypatch.setenv("KLINEBUS_SYMBOLS", "BTCUSDT, ethusdt,,BTCUSDT")
    assert load_settings(ChartsSettings).symbols == ["BTCUSDT", "ETHUSDT"]


def test_symbols_from_json_list(monkeypatch):
    monkeypatch.setenv("KLINEBUS_SYMBOLS", '["solusdt", "BTCUSDT"]')
    assert load_settings(ChartsSettings).symbols == ["SOLUSDT", "BTCUSDT"]


def test_symbols_unset_or_empty_means_every_symbol(monkeypatch):
    monkeypatch.delenv("KLINEBUS_SYMBOLS", raising=False)
    assert load_settings(ChartsSettings).symbols == []
    monkeypatch.setenv("KLINEBUS_SYMBOLS", "")
    assert load_settings(ChartsSettings).symbols == []


def test_bad_value_is_one_line(monkeypatch):
    monkeypatch.setenv("KLINEBUS_WINDOW", "1")
    with pytest.raises(SettingsError, match=r"^invalid setting KLINEBUS_WINDOW: .*") as exc:
        load_settings(ChartsSettings)
    assert "\n" not in str(exc.value)
