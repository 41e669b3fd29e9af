from __future__ import annotations

import uuid

import fsspec
import pytest

from services.charts.artifacts import ArtifactStore
from services.charts.events import chart_event
from libs.charting.fast import FastRenderer
from libs.charting.presets import ANALYSIS, CLASSIFIER224
from libs.charting.window import check_window

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DAY_MS = 86_400_000


@pytest.fixture(params=["folder", "file", "memory"])
def store(request, tmp_path):
    if request.param == "folder":
        return ArtifactStore(str(tmp_path / "charts"))
    if request.param == "file":
        return ArtifactStore(f"file://{tmp_path}/charts")
    return ArtifactStore(f"memory://charts-{uuid.uuid4().hex}")


def test_put_get_and_uri_readable_by_fsspec(store, full):
    png = FastRenderer(CLASSIFIER224).render(full)
    name = store.name_for("BTCUSDT", "1m", "classifier224", full.last_open_time, 1_700_000_000_000)
    uri = store.put(name, png)
    with fsspec.open(uri, "rb") as fh:  # any consumer reads the URI with fsspec alone
        assert fh.read() == png
    assert store.get(uri) == png and png.startswith(PNG_MAGIC)
    assert store.names() == [name]  # no temporary file left behind


def test_retention_expires_only_old(store):
    now = 1_800_000_000_000
    old = store.put(store.name_for("BTCUSDT", "1m", "analysis", 1, now - 8 * DAY_MS), b"old")
    keep = store.put(store.name_for("BTCUSDT", "1m", "analysis", 2, now - 6 * DAY_MS), b"new")
    assert store.expire(7 * 86400, now) == 1
    assert [n.split("/")[-1] for n in store.names()] == [keep.split("/")[-1]]
    assert old != keep


def test_expire_on_missing_root_is_nothing(tmp_path):
    assert ArtifactStore(str(tmp_path / "never")).expire(1, 10**13) == 0


def test_chart_event_carries_what_is_shown(full):
    w = check_window(full, 60)
    event = chart_event(w, ANALYSIS, "file:///x.png", 1_800_000_000_000)
    assert (event.symbol, event.interval, event.window) == ("BTCUSDT", "1m", 60)
    assert event.open_time == int(full.open_time[-1]) and event.first_open_time == int(full.open_time[-60])
    assert set(event.indicators) == {"sma_20", "ema_20", "macd", "macd_signal", "macd_hist", "rsi_14"}
    assert event.indicators["sma_20"] == pytest.approx(full.close[-20:].mean(), rel=1e-12)
    assert (event.width, event.height, event.preset) == (1000, 750, "analysis")
    assert set(event.patterns) <= {"hammer", "bullish_engulfing", "bearish_engulfing"} and event.patterns
