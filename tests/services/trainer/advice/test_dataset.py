"""The advice dataset on real shipped candles, checked against hand-worked minutes and an
independent computation from the raw CSV text."""

from __future__ import annotations

import csv
import gzip
import json
from decimal import Decimal
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from libs.common.errors import CliError
from services.trainer.advice import dataset as D
from services.trainer.advice import prompt as P

from .conftest import AVAX_1M, BTC_1M, ETH_1M, TRAIN_RANGE, VERIFY_RANGE

MINUTE = 60_000


def _config(train=TRAIN_RANGE, verify=VERIFY_RANGE, **kw) -> D.AdviceConfig:
    return D.AdviceConfig(D.parse_range(train), D.parse_range(verify), **kw)


def _raw_rows(path: Path) -> list[dict[str, str]]:
    with gzip.open(path, "rt") as fh:
        return list(csv.DictReader(fh))


def _row(frame: pd.DataFrame, open_time: int) -> dict:
    hit = frame[frame["open_time"] == open_time]
    assert len(hit) == 1, f"no single row at {open_time}"
    return hit.iloc[0].to_dict()


def test_first_btc_minute_matches_the_hand_worked_values(tmp_path):
    # Worked by hand from the first 12 rows of the shipped file (zcat | head): the 12th candle,
    # 2026-04-15 00:11 UTC, is the first with 11 predecessors.
    D.build([BTC_1M], tmp_path / "ds", _config())
    train = pd.read_parquet(tmp_path / "ds" / "train.parquet")
    row = _row(train, 1776211860000)
    context = json.loads(row["context"])
    assert context == {
        "open_changes": ["98.55000000", "82.69000000", "-17.09000000", "52.29000000", "196.46000000",
                         "80.50000000", "-12.95000000", "16.00000000", "35.44000000", "-48.92000000"],
        "prev_volumes": ["24.03852000", "8.79892000", "10.66424000", "57.69687000", "31.41655000",
                         "15.93500000", "12.67904000", "6.07031000", "10.82729000", "21.52855000"],
    }
    # open 74543.26 - 74614.52; high +56.72 (0.076 %) and low -13.84: under the 0.1 % line both ways
    assert row["accepted"] == '{"predicted_open_change":"-71.26000000","advice":"NOOP"}'
    assert row["open_change_text"] == "-71.26000000" and row["advice"] == "NOOP"
    # the previous minute fell 76.46 from its open 74614.52 (0.102 %) and never rose: SELL
    assert row["prev_advice"] == "SELL"
    rejected = json.loads(row["rejected"])
    assert rejected["predicted_open_change"] == "-48.92000000"  # the seed: the previous data point's change
    assert rejected["advice"] in {"BUY", "SELL"}
    assert row["prompt"] == P.instruction(False) + " ### Input:" + row["context"]
    assert train["open_time"].min() == 1776211860000  # nothing earlier has a full window


def test_threshold_moves_the_label(tmp_path):
    D.build([BTC_1M], tmp_path / "ds", _config(threshold=0.0005))
    row = _row(pd.read_parquet(tmp_path / "ds" / "train.parquet"), 1776211860000)
    assert row["advice"] == "BUY"  # +0.076 % up, -0.019 % down: past a 0.05 % line only upwards


def _independent(rows: list[dict[str, str]], n: int, threshold: Decimal, lookback: int = 10) -> dict:
    o = [Decimal(r["open"]) for r in rows]

    def q(d: Decimal) -> str:
        s = f"{d.quantize(Decimal('0.00000001')):f}"
        return "0.00000000" if s == "-0.00000000" else s

    def label(i: int) -> str:
        up = (Decimal(rows[i]["high"]) - o[i]) / o[i] >= threshold
        down = (o[i] - Decimal(rows[i]["low"])) / o[i] >= threshold
        return "BUY" if up and not down else "SELL" if down and not up else "NOOP"

    return {
        "open_changes": [q(o[i] - o[i - 1]) for i in range(n - lookback, n)],
        "prev_volumes": [q(Decimal(rows[i]["volume"])) for i in range(n - lookback, n)],
        "change": q(o[n] - o[n - 1]),
        "advice": label(n),
        "prev_advice": label(n - 1),
    }


@pytest.mark.parametrize("n", [11, 137, 301, 359])
def test_rows_agree_with_an_independent_decimal_computation(small_dataset, n):
    rows = _raw_rows(BTC_1M)
    want = _independent(rows, n, Decimal("0.001"))
    train = pd.read_parquet(small_dataset / "train.parquet")
    row = _row(train, int(rows[n]["open_time"]))
    context = json.loads(row["context"])
    assert context["open_changes"] == want["open_changes"]
    assert context["prev_volumes"] == want["prev_volumes"]
    assert json.loads(row["accepted"]) == {"predicted_open_change": want["change"], "advice": want["advice"]}
    assert row["prev_advice"] == want["prev_advice"]


def test_every_class_occurs_and_rejected_always_differs(small_dataset):
    frame = pd.concat([pd.read_parquet(small_dataset / f"{s}.parquet") for s in ("train", "verify")])
    assert set(frame["advice"]) == {"BUY", "NOOP", "SELL"}
    rejected = frame["rejected"].map(lambda t: json.loads(t)["advice"])
    assert (rejected != frame["advice"]).all()
    # both alternatives are drawn, not always the same one
    for advice in ("BUY", "NOOP", "SELL"):
        assert rejected[frame["advice"] == advice].nunique() == 2


def test_rejected_draws_are_seeded_per_minute(tmp_path):
    a = D.build([BTC_1M], tmp_path / "a", _config(seed=7))
    D.build([BTC_1M], tmp_path / "b", _config(seed=7))
    D.build([BTC_1M], tmp_path / "c", _config(seed=8))
    # a narrower range: the same minute keeps its draw
    D.build([BTC_1M], tmp_path / "d", _config(train="2026-04-15T03:00..2026-04-15T06:00", seed=7))
    ra, rb, rc, rd = (pd.read_parquet(tmp_path / x / "train.parquet").set_index("id")["rejected"] for x in "abcd")
    assert a["seed"] == 7
    assert ra.equals(rb)
    assert (ra != rc).any()
    assert ra.loc[rd.index].equals(rd)


def test_train_and_verify_never_share_a_candle(small_dataset):
    train = pd.read_parquet(small_dataset / "train.parquet")
    verify = pd.read_parquet(small_dataset / "verify.parquet")
    manifest = json.loads((small_dataset / "manifest.json").read_text())
    train_end = manifest["ranges_ms"]["train"][1]
    verify_start = manifest["ranges_ms"]["verify"][0]
    assert train["open_time"].max() < train_end  # targets inside the range
    # the earliest candle a verify item reads (11 minutes before its target) is inside verify
    assert (verify["open_time"] - 11 * MINUTE).min() >= verify_start
    assert train["open_time"].max() < (verify["open_time"] - 11 * MINUTE).min()
    # 2 hours of verify minutes, less the 11 whose window would reach back into training
    assert len(verify) == 120 - 11
    assert manifest["rows"] == {"train": len(train), "verify": len(verify)}


@pytest.mark.parametrize(
    "train, verify, message",
    [
        ("2026-04-15..2026-04-15T06:00", "2026-04-15T05:00..2026-04-15T08:00", "overlap"),
        ("2026-04-15T06:00..2026-04-15T08:00", "2026-04-15..2026-04-15T06:00", "later time slice"),
        ("2026-04-15T06:00..2026-04-15T06:00", "2026-04-15T07:00..2026-04-15T08:00", "empty"),
        ("2026-04-15", "2026-04-15T07:00..2026-04-15T08:00", "START..END"),
    ],
)
def test_impossible_ranges_are_one_line(tmp_path, train, verify, message):
    with pytest.raises(CliError, match=message):
        D.build([BTC_1M], tmp_path / "ds", _config(train, verify))
    assert not (tmp_path / "ds").exists()


def test_a_range_without_candles_says_so(tmp_path):
    with pytest.raises(CliError, match="no verify rows"):
        D.build([BTC_1M], tmp_path / "ds", _config(verify="2026-05-01..2026-05-02"))
    assert not (tmp_path / "ds").exists()
    assert not list(tmp_path.glob(".ds.tmp-*"))


def test_no_trade_counts_in_spot_files_means_no_list_and_a_note(small_dataset):
    manifest = json.loads((small_dataset / "manifest.json").read_text())
    assert manifest["has_trade_counts"] is False
    assert "BTCUSDT" in manifest["trade_counts_note"]
    train = pd.read_parquet(small_dataset / "train.parquet")
    assert not train["context"].str.contains("prev_trade_counts").any()
    assert train["prompt"].str.contains("Trade counts are not available").all()


def test_futures_file_keeps_its_real_trade_counts(tmp_path):
    # 60 real futures minutes from 2026-04-01 00:00; trade counts hand-read from rows 2..11
    manifest = D.build([AVAX_1M], tmp_path / "ds", _config("2026-04-01T00:00..2026-04-01T00:40",
                                                            "2026-04-01T00:40..2026-04-01T01:00"))
    assert manifest["has_trade_counts"] is True
    row = _row(pd.read_parquet(tmp_path / "ds" / "train.parquet"), 1775002260000)
    context = json.loads(row["context"])
    assert context["prev_trade_counts"] == [f"{n}.00000000" for n in (455, 231, 305, 179, 326, 233, 280, 163, 213, 361)]
    assert context["open_changes"] == ["0.00200000", "-0.00500000", "0.00200000", "0.00000000", "0.00300000",
                                       "-0.00600000", "0.00600000", "-0.00800000", "0.00200000", "-0.00500000"]
    assert row["open_change_text"] == "0.00600000"
    assert "Trade counts are not available" not in row["prompt"]


def test_mixing_sources_with_and_without_trade_counts_leaves_them_out_everywhere(tmp_path):
    manifest = D.build([AVAX_1M, BTC_1M], tmp_path / "ds",
                       _config("2026-04-01..2026-04-15T06:00", "2026-04-15T06:00..2026-04-15T08:00"))
    assert manifest["has_trade_counts"] is False
    assert manifest["per_symbol"]["AVAXUSDT"]["source_has_trade_counts"] is True
    assert manifest["per_symbol"]["BTCUSDT"]["source_has_trade_counts"] is False
    train = pd.read_parquet(tmp_path / "ds" / "train.parquet")
    assert set(train["symbol"]) == {"AVAXUSDT", "BTCUSDT"}
    assert not train["context"].str.contains("prev_trade_counts").any()


def test_windows_over_missing_minutes_are_skipped(tmp_path):
    lines = gzip.open(BTC_1M, "rt").read().splitlines()
    # drop the candle of 2026-04-15 01:00 (data row 61): windows that need it cannot be built
    holed = tmp_path / "BTCUSDT-1m-holed.csv"
    holed.write_text("\n".join(lines[:61] + lines[62:400]) + "\n")
    manifest = D.build([holed], tmp_path / "ds", _config("2026-04-15..2026-04-15T04:00", "2026-04-15T04:00..2026-04-15T06:00"))
    train = pd.read_parquet(tmp_path / "ds" / "train.parquet")
    missing = 1776211200000 + 60 * MINUTE
    # targets from 01:00 to 01:11 read the missing minute (as target, or in their 11 before it)
    assert not train["open_time"].between(missing, missing + 11 * MINUTE).any()
    assert train["open_time"].isin([missing - MINUTE, missing + 12 * MINUTE]).sum() == 2
    assert manifest["per_symbol"]["BTCUSDT"]["windows_skipped_for_gaps"] == 11  # 01:01..01:11 (01:00 is absent)


def test_archive_input_gives_the_same_rows_as_the_file(tmp_path):
    from libs.common.archive import ParquetArchive
    from libs.common.klines import read_kline_csv

    ParquetArchive(str(tmp_path / "archive")).write(read_kline_csv(BTC_1M))
    D.build([tmp_path / "archive"], tmp_path / "from-archive", _config())
    D.build([BTC_1M], tmp_path / "from-file", _config())
    for split in ("train", "verify"):
        a = pd.read_parquet(tmp_path / "from-archive" / f"{split}.parquet")
        b = pd.read_parquet(tmp_path / "from-file" / f"{split}.parquet")
        pd.testing.assert_frame_equal(a, b)


def test_an_fsspec_archive_url_is_read_too(tmp_path):
    from libs.common.archive import ParquetArchive
    from libs.common.klines import read_kline_csv

    url = f"memory://advice-{tmp_path.name}"
    ParquetArchive(url).write(read_kline_csv(BTC_1M))
    manifest = D.build([url], tmp_path / "ds", _config())
    assert manifest["symbols"] == ["BTCUSDT"] and manifest["per_symbol"]["BTCUSDT"]["sources"][0]["archive"] == url
    with pytest.raises(CliError, match="no such archive"):
        D.build([f"memory://nothing-{tmp_path.name}"], tmp_path / "ds2", _config())


def test_orpo_export_is_conversational_preference_pairs(small_dataset):
    table = pq.read_table(small_dataset / "orpo" / "train.parquet").to_pylist()
    train = pd.read_parquet(small_dataset / "train.parquet")
    assert len(table) == len(train)
    first = table[0]
    assert first["prompt"] == [{"role": "user", "content": train["prompt"].iloc[0]}]
    assert first["chosen"] == [{"role": "assistant", "content": train["accepted"].iloc[0]}]
    assert first["rejected"] == [{"role": "assistant", "content": train["rejected"].iloc[0]}]


def test_seed_examples_fix_the_nested_context():
    for context, _ in P.SEED_EXAMPLES:
        assert list(context) == ["open_changes", "prev_volumes", "prev_trade_counts"]
        assert all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in context.values())
    shots = P.example_messages(has_trade_counts=False)
    assert len(shots) == 6
    assert not any("prev_trade_counts" in m["content"].partition("### Input:")[2] for m in shots)
    assert shots[5]["content"] == '{"predicted_open_change":"-0.00002200","advice":"SELL"}'


def test_bad_inputs_are_one_line(tmp_path):
    with pytest.raises(CliError, match="no such file"):
        D.build([tmp_path / "nope.csv"], tmp_path / "ds", _config())
    with pytest.raises(CliError, match="1m candles"):
        D.build([Path(__file__).parents[3] / "data" / "klines" / "BTCUSDT-15m-2023-04-01-head3000.csv.gz"],
                tmp_path / "ds", _config())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(CliError, match="--overwrite"):
        D.build([BTC_1M], tmp_path / "full", _config())
    assert (tmp_path / "full" / "x").read_text() == "keep me"


def test_symbols_filter_and_two_symbols(tmp_path):
    m = D.build([BTC_1M, ETH_1M], tmp_path / "ds", _config(), symbols=["ETHUSDT"])
    assert m["symbols"] == ["ETHUSDT"]
