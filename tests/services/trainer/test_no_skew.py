"""No train/serve skew by construction: a dataset built with ``--start`` holds, for its first window,
exactly what serving's window code (services/inference/windows.py) gives when the features service
has run from the archive's first candle, cumulative features (OBV, VPT) included."""

from __future__ import annotations

import numpy as np
import pytest

from libs.common.klines import read_kline_frame
from libs.indicators.batch import compute_frame
from libs.indicators.feature_sets import get_feature_set
from libs.indicators.streaming import StreamingEngine
from services.inference.windows import Request, Windows
from services.trainer.datasets import BuildSpec, build_dataset
from services.trainer.datasets.sequence import SequenceDataset

from .conftest import BTC_15M

LOOKBACK = 20


def served_window(frame, feature_set: str, features: list[str], upto_open_time: int) -> np.ndarray:
    """What inference holds for the window ending at ``upto_open_time``: the streaming engine fed
    from the file's (the archive's) first candle, its rows pushed into ``Windows``."""
    engine = StreamingEngine(feature_set)
    win = Windows(capacity=LOOKBACK)
    for row in frame.itertuples():
        if row.open_time > upto_open_time:
            break
        u = engine.update(("BTCUSDT", "15m"), row.open_time, row.open, row.high, row.low, row.close, row.volume)
        if u.values is not None:
            win.push("BTCUSDT", "15m", row.open_time, row.close, feature_set, dict(u.values))
    w, _, reason = win.window(("BTCUSDT", "15m"), Request(feature_set, tuple(features), LOOKBACK))
    assert reason == "", reason
    return w


@pytest.mark.parametrize("feature_set", ["lstm-35-v1", "lstm-35-v2"])
def test_first_window_with_start_equals_served_window(tmp_path, feature_set):
    frame = read_kline_frame(BTC_15M)
    start = int(frame["open_time"].iloc[1200])
    out = tmp_path / feature_set
    m = build_dataset(BuildSpec(kind="lstm-close", inputs=[str(BTC_15M)], out=out, start=start,
                                feature_set=feature_set, lookback=LOOKBACK, horizon=2))
    ds = SequenceDataset(out)
    z = np.load(out / m["series"][0]["file"])
    a0 = int(z["anchors_train"][0])
    ot = z["open_time"]
    assert ot[a0 - LOOKBACK + 1] >= start  # --start clips windows...
    assert ot[a0 - LOOKBACK] < start  # ...and the first one starts right there
    assert m["series"][0]["feature_origin"] == int(frame["open_time"].iloc[0])  # ...not the features' origin
    train = ds.split("train")
    dataset_window = train.raw_features[train.window_index(np.array([0]), LOOKBACK)][0]
    live = served_window(frame, feature_set, ds.features, int(ot[a0]))
    scale = np.maximum(np.abs(live).max(axis=0), 1.0)
    assert np.max(np.abs(dataset_window - live) / scale) <= 1e-9
    cumulative = {"obv", "vpt"} & set(ds.features)
    assert m["cumulative_features"] == sorted(cumulative)
    if feature_set == "lstm-35-v1":
        # What the fix removed: the same features computed from --start put OBV at another level.
        clipped = frame[frame["open_time"] >= start].reset_index(drop=True)
        from_start = compute_frame(clipped, ["obv"], interval_ms=900_000)["obv"].to_numpy()
        k = ds.features.index("obv")
        assert abs(from_start[LOOKBACK - 1] - dataset_window[-1, k]) > 1.0
    else:
        assert not cumulative


def test_lstm_close_defaults_to_the_set_without_cumulative_features():
    fs = get_feature_set("lstm-35-v2")
    assert not {"obv", "vpt"} & set(fs.features)
    assert set(get_feature_set("lstm-35-v1").features) - set(fs.features) == {"obv", "vpt"}
    from services.trainer.datasets.sequence import SEQUENCE_KINDS

    assert SEQUENCE_KINDS["lstm-close"].feature_set == "lstm-35-v2"
