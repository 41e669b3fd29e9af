"""``dataset build --kind chart-classifier`` on real shipped candles: index, text, labels, charts,
splits, gaps, resuming an interrupted build, and the errors a user can make."""

from __future__ import annotations

import csv
import gzip
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from services.trainer.classifier.dataset import INDEX_COLUMNS, load_index
from services.trainer.datasets import BuildSpec, DatasetError, build_dataset

from .conftest import BTC_15M, BTC_15M_START, ETH_1H_GAPS, WINDOW

MS_15M = 15 * 60_000
MS_1H = 60 * 60_000


def _raw(path: Path) -> dict[int, list[str]]:
    """The CSV rows by open time, read without the project's readers."""
    with gzip.open(path, "rt") as fh:
        rows = list(csv.reader(fh))
    return {int(r[0]): r for r in rows[1:]}


def _spec(out: Path, renderer, **kw) -> BuildSpec:
    base = dict(kind="chart-classifier", inputs=[str(BTC_15M)], out=out, symbols=["BTCUSDT"], intervals=["15m"],
                start=BTC_15M_START, lookback=WINDOW, train_fraction=0.5, validation_fraction=0.25,
                extra={"renderer": renderer, "workers": 0})
    base.update(kw)
    return BuildSpec(**base)


def test_index_has_the_seeds_columns_then_ours(btc_dataset):
    header = (btc_dataset / "index.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["image_path", "text", "label", "next_close"]
    assert tuple(header) == INDEX_COLUMNS


def test_rows_are_the_real_candles_with_the_next_candles_move(btc_dataset):
    raw = _raw(BTC_15M)
    index = load_index(btc_dataset)
    assert len(index) > 60
    for r in index.itertuples():
        o, h, lo, c, v = (raw[r.open_time][k] for k in (1, 2, 3, 4, 5))
        assert r.text == (f"Open: {float(o):.2f}, High: {float(h):.2f}, Low: {float(lo):.2f}, "
                          f"Close: {float(c):.2f}, Volume: {float(v):.0f}")
        nxt = float(raw[r.open_time + MS_15M][4])
        assert r.next_close == nxt and r.close == float(c)
        move = nxt / float(c) - 1
        # bullish means up, bearish down, and a move inside the band is never directional
        assert {0: move < 0, 1: True, 2: move > 0}[r.label]
        assert r.first_open_time == r.open_time - (WINDOW - 1) * MS_15M
        assert r.symbol == "BTCUSDT" and r.interval == "15m" and r.open_time >= BTC_15M_START
    assert set(index["label"]) == {0, 1, 2}  # not degenerate


def test_charts_are_224_px_rgb_pngs_one_per_row(btc_dataset):
    index = load_index(btc_dataset)
    files = sorted(p.name for p in (btc_dataset / "images").iterdir())
    assert files == sorted(Path(p).name for p in index["image_path"])
    for p in index["image_path"][:5]:
        with Image.open(btc_dataset / p) as im:
            assert im.format == "PNG" and im.size == (224, 224) and im.mode == "RGB"
            assert len(np.unique(np.asarray(im).reshape(-1, 3), axis=0)) > 3  # candles drawn, not a blank


def test_splits_are_time_ordered_with_the_embargo_and_counted_in_the_manifest(btc_dataset):
    index = load_index(btc_dataset)
    manifest = json.loads((btc_dataset / "manifest.json").read_text())
    order = {"train": 0, "validation": 1, "test": 2}
    assert (np.diff(index["split"].map(order).to_numpy()) >= 0).all()
    assert (np.diff(index["open_time"].to_numpy()) > 0).all()
    for a, b in (("train", "validation"), ("validation", "test")):
        gap = index.loc[index.split == b, "open_time"].min() - index.loc[index.split == a, "open_time"].max()
        assert gap >= (WINDOW + 1) * MS_15M  # a later chart never shows a candle of the earlier slice
    for split, counts in manifest["class_counts"].items():
        labels = index.loc[index.split == split, "label"]
        assert counts == {"bearish": int((labels == 0).sum()), "neutral": int((labels == 1).sum()),
                          "bullish": int((labels == 2).sum())}
    assert manifest["complete"] is True and manifest["embargo_candles"] == WINDOW + 1
    assert manifest["sources"][0]["sha256"] and manifest["renderer"]["preset"] == "classifier224"


def test_no_chart_spans_a_gap_in_the_candles(tmp_path, renderer):
    raw = _raw(ETH_1H_GAPS)
    times = sorted(raw)
    gaps = [t for t, u in zip(times, times[1:]) if u - t != MS_1H]
    assert len(gaps) == 2  # the 2021-04-20 and 2021-04-25 outages
    start = times[0]
    end = times[0] + 700 * MS_1H  # the first ~700 candles hold both gaps
    build_dataset(_spec(tmp_path / "eth", renderer, inputs=[str(ETH_1H_GAPS)], symbols=["ETHUSDT"], intervals=["1h"],
                        start=start, end=end, train_fraction=0.6, validation_fraction=0.2, extra={"renderer": renderer,
                        "workers": 0, "stride": 4}))
    index = load_index(tmp_path / "eth")
    for r in index.itertuples():
        span = range(r.first_open_time, r.open_time + 2 * MS_1H, MS_1H)
        assert all(t in raw for t in span), f"chart ending {r.open_time} spans a gap"
    assert (np.diff(index["open_time"]) % (4 * MS_1H) != 0).any()  # rows around the gaps were skipped


class _Interrupted(Exception):
    pass


class _StopAfter:
    """A renderer that renders ``n`` charts for real, then dies like a killed build."""

    def __init__(self, inner, n: int) -> None:
        self.inner, self.n = inner, n

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def render(self, *args, **kw):
        for k, path in enumerate(self.inner.render(*args, **kw)):
            yield path
            if k + 1 >= self.n:
                raise _Interrupted()


def test_an_interrupted_build_resumes_where_it_stopped(tmp_path, renderer, btc_dataset):
    out = tmp_path / "btc"
    with pytest.raises(_Interrupted):
        build_dataset(_spec(out, renderer, extra={"renderer": _StopAfter(renderer, 7), "workers": 0}))
    partial = tmp_path / ".btc.partial"
    assert not out.exists() and len(list((partial / "images").glob("*.png"))) == 7
    with pytest.raises(DatasetError, match="did not finish|not a chart-classifier dataset"):
        load_index(out)

    counted = []

    class Counting(_StopAfter):
        def render(self, frame, symbol, interval, jobs, workers):
            counted.append(len(jobs))
            yield from self.inner.render(frame, symbol, interval, jobs, workers)

    manifest = build_dataset(_spec(out, renderer, extra={"renderer": Counting(renderer, 0), "workers": 0}))
    total = sum(manifest["samples"].values())
    assert counted == [total - 7]  # only the missing charts were rendered
    assert not partial.exists()
    assert (out / "index.csv").read_text() == (btc_dataset / "index.csv").read_text()
    for name in ("BTCUSDT-15m-%d.png" % t for t in load_index(out)["open_time"][:10]):
        assert (out / "images" / name).read_bytes() == (btc_dataset / "images" / name).read_bytes()
    # Built once: the same build again renders nothing; another spec into the same folder is refused.
    counted.clear()
    build_dataset(_spec(out, renderer, extra={"renderer": Counting(renderer, 0), "workers": 0}))
    assert counted == []
    with pytest.raises(DatasetError, match="exists and holds something else"):
        build_dataset(_spec(out, renderer, extra={"renderer": renderer, "workers": 0, "neutral_atr_multiple": 0.5}))


def test_charts_render_in_parallel_processes_identically(tmp_path, renderer, btc_dataset):
    out = tmp_path / "par"
    build_dataset(_spec(out, renderer, extra={"renderer": renderer, "workers": 2, "stride": 9}))
    index = load_index(out)
    assert len(index) >= 6
    for p in index["image_path"]:
        assert (out / p).read_bytes() == (btc_dataset / p).read_bytes()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(symbols=["BTCUSDT", "ETHUSDT"]), "one symbol and one interval"),
        (dict(symbols=["XRPUSDT"]), "no candles for XRPUSDT"),
        (dict(start=BTC_15M_START + 10**12), "no chart fits"),
        (dict(train_fraction=0.9, validation_fraction=0.05), "leave no validation split after a 11-candle embargo"),
        (dict(inputs=["/nonexistent/BTCUSDT-15m-x.csv.gz"]), "nonexistent"),
    ],
)
def test_impossible_requests_fail_with_one_line(tmp_path, renderer, change, message):
    with pytest.raises(DatasetError, match=message) as info:
        build_dataset(replace(_spec(tmp_path / "x", renderer), **change))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "x").exists()


def test_neutral_band_of_0_2_atr_keeps_every_class_on_real_hourly_data(tmp_path):
    # The band's claim in labels.py, on the shipped ETHUSDT 1h candles (3000 real hours).
    from services.trainer.classifier.dataset import DatasetSpec, plan_index
    from services.trainer.sources import load_series

    frame = next(iter(load_series([str(ETH_1H_GAPS)], ["ETHUSDT"], ["1h"]).values())).frame
    index, _ = plan_index(frame, DatasetSpec("ETHUSDT", "1h", window=30), warmup=20)
    share = np.bincount(index["label"], minlength=3) / len(index)
    assert (share > 0.2).all() and (share < 0.45).all(), share
    assert isinstance(index, pd.DataFrame)
