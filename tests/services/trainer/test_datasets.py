"""Sequence datasets: time splits with an embargo, train-only scalers, train/serve parity, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from klinebus.cli import main
from libs.common.klines import read_kline_frame
from libs.indicators.streaming import StreamingEngine
from services.trainer.datasets import BuildSpec, DatasetError, build_dataset, kinds
from services.trainer.datasets.sequence import SequenceDataset

from .conftest import BTC_15M, DOGE_15M, ETH_1H_GAPS


def test_kinds_registered():
    assert {"bilstm-ohlc", "lstm-close"} <= set(kinds())


def test_splits_follow_in_time_with_embargo(bilstm_dataset):
    m = json.loads((bilstm_dataset / "manifest.json").read_text())
    assert m["feature_set"] == "bilstm-13-v1" and len(m["features"]) == 13
    assert m["lookback"] == 60 and m["horizons"] == [1] and m["targets"] == ["open", "close", "high", "low"]
    z = np.load(bilstm_dataset / m["series"][0]["file"])
    tr, va, ga, te = z["anchors_train"], z["anchors_validation"], z["anchors_gate"], z["anchors_test"]
    assert len(tr) and len(va) and len(ga) and len(te)
    assert tr.max() < va.min() and va.max() < ga.min() and ga.max() < te.min()
    # no window or target shared across a cut: lookback + horizon anchors at least between slices
    assert va.min() - tr.max() >= 60 + 1 and ga.min() - va.max() >= 60 + 1 and te.min() - ga.max() >= 60 + 1
    assert m["embargo"] >= m["lookback"] + max(m["horizons"])
    # within a slice, anchors are consecutive candles (nothing shuffled, nothing dropped but warm-up)
    assert np.all(np.diff(tr) == 1) and np.all(np.diff(te) == 1)
    r = m["ranges"]
    assert r["train"]["end"] < r["validation"]["start"] < r["validation"]["end"] < r["gate"]["start"]
    assert r["gate"]["end"] < r["test"]["start"]
    assert sum(m["samples"].values()) == len(tr) + len(va) + len(ga) + len(te)
    # default fractions: 70 / 15 %, the rest halved between gate and test
    assert m["spec"]["gate_fraction"] == pytest.approx(0.075)
    assert m["series"][0]["sources"][0]["sha256"] and m["series"][0]["sources"][0]["path"].endswith(BTC_15M.name)


def test_scalers_are_fitted_on_train_only(bilstm_dataset):
    m = json.loads((bilstm_dataset / "manifest.json").read_text())
    z = np.load(bilstm_dataset / m["series"][0]["file"])
    feats, last_train = z["features"], z["anchors_train"].max()
    seen = feats[m["feature_warmup"] : last_train + 1]
    x = m["scalers"]["inputs"]
    assert x["kind"] == "minmax"
    np.testing.assert_allclose(x["center"], np.nanmin(seen, axis=0))
    np.testing.assert_allclose(np.asarray(x["center"]) + np.asarray(x["scale"]), np.nanmax(seen, axis=0))
    # fitted on the whole file the scaler would differ: later candles did not leak into it
    everything = feats[m["feature_warmup"] :]
    assert not np.allclose(x["center"], np.nanmin(everything, axis=0)) or not np.allclose(
        np.asarray(x["center"]) + np.asarray(x["scale"]), np.nanmax(everything, axis=0))
    prices = z["prices"]
    a = z["anchors_train"]
    y = np.log(prices[a + 1][:, 3] / prices[a, 3])
    t = m["scalers"]["targets"]
    assert t["columns"][1] == "close@1"
    assert t["center"][1] == pytest.approx(float(y.mean()), rel=1e-9)


def test_features_equal_the_streaming_engine(bilstm_dataset):
    """Train/serve parity: what the dataset holds is what the features service computes live."""
    m = json.loads((bilstm_dataset / "manifest.json").read_text())
    z = np.load(bilstm_dataset / m["series"][0]["file"])
    frame = read_kline_frame(BTC_15M)
    engine = StreamingEngine(m["feature_set"])
    live = np.full_like(z["features"], np.nan)
    for i, row in enumerate(frame.itertuples()):
        u = engine.update(("BTCUSDT", "15m"), row.open_time, row.open, row.high, row.low, row.close, row.volume)
        if u.values is not None:
            live[i] = [u.values[f] for f in m["features"]]
    ok = ~np.isnan(live).any(axis=1)
    assert ok.sum() > 2800
    scale = np.maximum(np.nanmax(np.abs(live), axis=0), 1.0)
    assert np.max(np.abs(z["features"][ok] - live[ok]) / scale) <= 1e-9


def test_windows_across_a_gap_are_dropped(tmp_path):
    out = tmp_path / "eth"
    build_dataset(BuildSpec(kind="bilstm-ohlc", inputs=[str(ETH_1H_GAPS)], out=out, lookback=20))
    ds = SequenceDataset(out)
    z = np.load(out / ds.manifest["series"][0]["file"])
    ot = z["open_time"]
    step = 3_600_000
    for name in ("train", "validation", "test"):
        a = z[f"anchors_{name}"]
        spans = ot[a + 1] - ot[a - 20 + 1]
        assert np.all(spans == 20 * step), name  # every window and its target are consecutive hours


def test_lstm_close_skips_features_without_history(tmp_path):
    # 700 candles: a 200-candle warm-up is more than a quarter of the series, so SMA/EMA 200 go
    out = tmp_path / "short"
    frame = read_kline_frame(DOGE_15M)
    end = int(frame["open_time"].iloc[699])
    m = build_dataset(BuildSpec(kind="lstm-close", inputs=[str(DOGE_15M)], out=out, end=end, lookback=20))
    assert set(m["skipped_features"]) == {"sma_200", "ema_200"}
    assert "sma_200" not in m["features"] and "sma_100" in m["features"]
    assert m["horizons"] == list(range(1, 8))
    assert "warm-up" in m["skipped_features"]["sma_200"]


def test_unified_dataset_cuts_all_series_at_the_same_times(tmp_path):
    out = tmp_path / "uni"
    m = build_dataset(BuildSpec(kind="lstm-close", inputs=[str(BTC_15M), str(DOGE_15M)], out=out, lookback=30, horizon=3))
    assert [s["symbol"] for s in m["series"]] == ["BTCUSDT", "DOGEUSDT"]
    cut_val, cut_test = m["cuts"]["validation_start"], m["cuts"]["test_start"]
    for s in m["series"]:
        z = np.load(out / s["file"])
        ot = z["open_time"]
        assert ot[z["anchors_train"] + 3].max() < cut_val
        assert ot[z["anchors_validation"] - 29].min() >= cut_val
        assert ot[z["anchors_test"] - 29].min() >= cut_test


def test_refusals_are_one_line_and_leave_nothing(tmp_path, capsys):
    frame = read_kline_frame(BTC_15M)
    out = tmp_path / "tiny"
    with pytest.raises(DatasetError, match="too little history"):
        build_dataset(BuildSpec(kind="bilstm-ohlc", inputs=[str(BTC_15M)], out=out, end=int(frame["open_time"].iloc[150])))
    with pytest.raises(DatasetError, match="no candles for ETHUSDT"):
        build_dataset(BuildSpec(kind="bilstm-ohlc", inputs=[str(BTC_15M)], out=out, symbols=["ETHUSDT"], intervals=["15m"]))
    with pytest.raises(DatasetError, match="unknown dataset kind"):
        build_dataset(BuildSpec(kind="gpt", inputs=[str(BTC_15M)], out=out))
    with pytest.raises(DatasetError, match="unknown feature set"):
        build_dataset(BuildSpec(kind="bilstm-ohlc", inputs=[str(BTC_15M)], out=out, feature_set="nope-v9"))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no staging folder left behind
    assert main(["dataset", "build", "--kind", "bilstm-ohlc", "--input", str(BTC_15M), "--out", str(out),
                 "--end", "2023-04-02"]) == 2
    err = capsys.readouterr().err
    assert "too little history" in err and len(err.strip().splitlines()) == 1


def test_cli_builds_a_dataset(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["dataset", "build", "--kind", "lstm-close", "--input", str(BTC_15M), "--symbols", "BTCUSDT",
                 "--intervals", "15m", "--lookback", "30", "--horizon", "2", "--out", str(out)]) == 0
    assert "samples train" in capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    assert m["kind"] == "lstm-close" and m["lookback"] == 30 and m["horizons"] == [1, 2]
    assert main(["dataset", "build", "--kind", "lstm-close", "--input", str(BTC_15M), "--out", str(out)]) == 2
    assert "written once" in capsys.readouterr().err
