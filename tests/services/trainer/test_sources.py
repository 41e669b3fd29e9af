"""Training candles from kline files and from the Parquet archive; ``klinebus data stats``."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil

import pytest

from klinebus.cli import main
from libs.common.archive import ParquetArchive
from libs.common.klines import read_kline_csv
from services.trainer.sources import SourceError, data_stats, load_series

from .conftest import BTC_15M, DOGE_15M, ETH_1H_GAPS


def _data_lines(path) -> list[str]:
    with gzip.open(path, "rt") as f:
        return [line for line in f.read().splitlines()[1:] if line.strip()]


def test_files_give_rows_range_gaps_and_hashes():
    lines = _data_lines(ETH_1H_GAPS)
    series = load_series([str(ETH_1H_GAPS)])
    s = series[("ETHUSDT", "1h")]
    assert len(s.frame) == len(lines) == 3000
    assert s.frame["open_time"].iloc[0] == int(lines[0].split(",")[0])
    assert s.frame["open_time"].iloc[-1] == int(lines[-1].split(",")[0])
    assert s.sources[0].sha256 == hashlib.sha256(ETH_1H_GAPS.read_bytes()).hexdigest()
    (st,) = data_stats([str(ETH_1H_GAPS)])
    # the README of tests/data/klines names two outages: 2 and 3 missing hours
    assert (st.rows, st.gaps, st.missing_candles) == (3000, 2, 5)


def test_archive_and_files_agree(tmp_path):
    archive = ParquetArchive(str(tmp_path / "archive"))
    archive.write(read_kline_csv(ETH_1H_GAPS))
    archive.write(read_kline_csv(BTC_15M))
    from_archive = {(s.symbol, s.interval): s for s in data_stats([str(tmp_path / "archive")])}
    from_files = {(s.symbol, s.interval): s for s in data_stats([str(ETH_1H_GAPS), str(BTC_15M)])}
    assert from_archive.keys() == from_files.keys() == {("ETHUSDT", "1h"), ("BTCUSDT", "15m")}
    for key in from_files:
        a, f = from_archive[key], from_files[key]
        assert (a.rows, a.first_open_time, a.last_open_time, a.gaps, a.missing_candles) == (
            f.rows, f.first_open_time, f.last_open_time, f.gaps, f.missing_candles)
        assert a.last_update_ms is not None
    # the archive keeps one file per month; every one is listed with its sha256
    s = load_series(str(tmp_path / "archive"), ["ETHUSDT"], ["1h"])[("ETHUSDT", "1h")]
    assert len(s.sources) == len(archive.months("ETHUSDT", "1h")) > 1
    assert all(len(src.sha256) == 64 for src in s.sources)


def test_folder_of_files_and_filters(tmp_path):
    for f in (BTC_15M, DOGE_15M):
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "notes-without-binance-name.csv").write_text("x\n")  # skipped in a folder listing
    series = load_series([str(tmp_path)], symbols=["dogeusdt"])
    assert list(series) == [("DOGEUSDT", "15m")]
    start = int(series[("DOGEUSDT", "15m")].frame["open_time"].iloc[100])
    clipped = load_series([str(tmp_path)], symbols=["DOGEUSDT"], intervals=["15m"], start=start)
    assert len(clipped[("DOGEUSDT", "15m")].frame) == 3000 - 100


def test_impossible_asks_are_one_line():
    with pytest.raises(SourceError, match=r"no candles for ETHUSDT 15m .*it has: BTCUSDT 15m"):
        load_series([str(BTC_15M)], ["ETHUSDT"], ["15m"])
    with pytest.raises(SourceError, match="no kline files match"):
        load_series(["/nonexistent/*.csv.gz"])
    with pytest.raises(SourceError, match="in the asked time range"):
        load_series([str(BTC_15M)], start=4_000_000_000_000)


def test_cli_data_stats_json_and_table(capsys, tmp_path):
    assert main(["data", "stats", "--input", str(ETH_1H_GAPS), str(BTC_15M), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by = {(r["symbol"], r["interval"]): r for r in rows}
    assert by[("ETHUSDT", "1h")]["gaps"] == 2 and by[("BTCUSDT", "15m")]["rows"] == 3000
    assert main(["data", "stats", "--input", str(BTC_15M)]) == 0
    out = capsys.readouterr().out
    assert "BTCUSDT" in out and "3,000" in out and "2023-04-01 00:00" in out
    assert main(["data", "stats", "--input", str(tmp_path / "empty-archive")]) == 2
    assert "no such archive" in capsys.readouterr().err
