from __future__ import annotations

import csv

from klinebus.cli import main
from services.charts.dataset import build_dataset
from libs.charting.presets import CLASSIFIER224

from tests.libs.charting.conftest import DATA, pixels


def test_dataset_windows_index_and_labels(tmp_path, frame):
    summary = build_dataset(DATA, tmp_path, CLASSIFIER224, stride=50, workers=2, symbol="BTCUSDT", interval="1m",
                            progress=False)
    rows = list(csv.DictReader(open(summary.index)))
    # windows end at 30 + 19 (SMA20 warm-up), then every 50 candles, up to the 300 candles there are
    assert summary.images == len(rows) == len(range(49, 301, 50)) == 6
    closes = frame["close"].to_numpy()
    for row, end in zip(rows, range(49, 301, 50)):
        assert int(row["last_open_time"]) == int(frame["open_time"].iloc[end - 1])
        assert float(row["last_close"]) == closes[end - 1]
        assert row["next_close"] == (str(closes[end]) if end < len(closes) else "")
        assert pixels((tmp_path / row["image"]).read_bytes()).shape == (224, 224, 3)


def test_cli_render_and_dataset(tmp_path, capsys):
    out = tmp_path / "one.png"
    assert main(["charts", "render", "--input", str(DATA), "--symbol", "BTCUSDT", "--interval", "1m",
                 "--out", str(out), "--window", "100", "--width", "640", "--height", "480"]) == 0
    assert pixels(out.read_bytes()).shape == (480, 640, 3)
    assert main(["charts", "dataset", "--input", str(DATA), "--symbol", "BTCUSDT", "--interval", "1m",
                 "--out", str(tmp_path / "ds"), "--preset", "classifier224", "--stride", "100", "--workers", "0"]) == 0
    assert len(list((tmp_path / "ds" / "images").iterdir())) == 3
    assert main(["charts", "render", "--input", str(DATA), "--symbol", "BTCUSDT", "--interval", "1m",
                 "--out", str(out), "--window", "1000"]) == 2
    assert "need 1000 candles for the window, have 300" in capsys.readouterr().err
