"""The dataset builder, now on the direct path, writes the files and labels it wrote before.

Before, every image came from ``FastRenderer`` through the pool; here each file must hold the
very bytes ``FastRenderer`` gives for its window, and ``index.csv`` the rows the windows imply.
"""

from __future__ import annotations

import csv
import io

from libs.charting.fast import FastRenderer
from libs.charting.presets import CLASSIFIER224
from services.charts.dataset import INDEX_COLUMNS, build_dataset

from tests.libs.charting.conftest import DATA


def _expected_rows(frame, full, stride: int = 1) -> list[list[str]]:
    first_end = CLASSIFIER224.window + 19  # SMA 20 warm-up
    rows = []
    for end in range(first_end, len(full) + 1, stride):
        last = int(frame["open_time"].iloc[end - 1])
        rows.append([
            f"images/BTCUSDT-1m-classifier224-{last}.png", "BTCUSDT", "1m",
            str(int(frame["open_time"].iloc[end - CLASSIFIER224.window])), str(last),
            str(float(frame["close"].iloc[end - 1])),
            str(float(frame["close"].iloc[end])) if end < len(full) else "",
        ])
    return rows


def test_every_file_is_the_fast_paths_bytes_and_the_index_is_unchanged(tmp_path, frame, full):
    summary = build_dataset(DATA, tmp_path, CLASSIFIER224, workers=0, symbol="BTCUSDT", interval="1m",
                            progress=False)
    text = summary.index.read_text()
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == list(INDEX_COLUMNS)
    assert rows[1:] == _expected_rows(frame, full)
    assert summary.images == len(rows) - 1 == 300 - 49 + 1
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == sorted(r[0][len("images/"):] for r in rows[1:])
    fast = FastRenderer(CLASSIFIER224)
    for row in rows[1:]:
        end = int(frame.index[frame["open_time"] == int(row[4])][0]) + 1
        assert (tmp_path / row[0]).read_bytes() == fast.render(full.slice(end - CLASSIFIER224.window, end)), row[0]


def test_pool_writes_the_same_files_as_one_process(tmp_path):
    one = build_dataset(DATA, tmp_path / "one", CLASSIFIER224, stride=7, workers=0, symbol="BTCUSDT",
                        interval="1m", progress=False)
    two = build_dataset(DATA, tmp_path / "two", CLASSIFIER224, stride=7, workers=2, symbol="BTCUSDT",
                        interval="1m", progress=False)
    assert one.index.read_bytes() == two.index.read_bytes()
    names = sorted(p.name for p in (tmp_path / "one" / "images").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two" / "images").iterdir()) and len(names) == one.images
    for name in names:
        assert (tmp_path / "one" / "images" / name).read_bytes() == (tmp_path / "two" / "images" / name).read_bytes()
