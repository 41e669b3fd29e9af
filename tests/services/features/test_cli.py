"""`klinebus features compute` end to end on real kline files."""

from __future__ import annotations

import numpy as np
import pandas as pd

from klinebus.cli import main
from libs.indicators.batch import compute_batch
from libs.indicators.feature_sets import get_feature_set

from tests.candles import BTC_15M, ETH_1H_GAPS, load


def test_compute_writes_one_column_per_feature(tmp_path, capsys):
    out = tmp_path / "features.parquet"
    assert main(["features", "compute", "--input", str(BTC_15M), "--output", str(out),
                 "--feature-set", "bilstm-13-v1"]) == 0
    frame = pd.read_parquet(out)
    names = get_feature_set("bilstm-13-v1").features
    assert list(frame.columns) == ["open_time", *names]
    candles = load(BTC_15M)
    assert (frame["open_time"].to_numpy() == candles.open_time).all()
    expected = compute_batch(*candles.ohlcv, names=names)
    for name in names:
        np.testing.assert_array_equal(frame[name].to_numpy(), expected[name])
    assert "wrote 3000 rows" in capsys.readouterr().out


def test_parquet_input_and_default_set(tmp_path):
    src = tmp_path / "in.parquet"
    pd.read_csv(BTC_15M).iloc[:300].to_parquet(src)
    out = tmp_path / "out.parquet"
    assert main(["features", "compute", "--input", str(src), "--output", str(out)]) == 0
    assert list(pd.read_parquet(out).columns) == ["open_time", *get_feature_set("all-v1").features]


def test_gap_fails_with_one_line_unless_allowed(tmp_path, capsys):
    out = tmp_path / "eth.parquet"
    assert main(["features", "compute", "--input", str(ETH_1H_GAPS), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "open_time jumps" in err and "\n" not in err and not out.exists()
    assert main(["features", "compute", "--input", str(ETH_1H_GAPS), "--output", str(out), "--allow-gaps"]) == 0
    assert len(pd.read_parquet(out)) == 3000


def test_unknown_feature_set_is_one_line(tmp_path, capsys):
    out = tmp_path / "x.parquet"
    assert main(["features", "compute", "--input", str(BTC_15M), "--output", str(out),
                 "--feature-set", "nope-v9"]) == 2
    assert "unknown feature set 'nope-v9'" in capsys.readouterr().err
