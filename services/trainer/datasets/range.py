"""``range-vol`` datasets: candles for the range / realised-volatility forecasters (services/trainer/range_model.py).

A sample is anchored at a closed candle ``t``: inputs are the high, low and close of candles
``t-lookback+1 .. t`` (raw prices; the models take log relative ranges of them), targets the
next candle's range and the realised volatility of the next ``horizon`` candles. No indicator is
involved, so nothing depends on where the history starts (no train/serve origin skew).

Four slices by time over all series together (train, validation, gate, test), each sample's
window and targets inside its slice. Folder layout as the sequence kinds': ``manifest.json`` and
``series-<SYMBOL>-<interval>.npz`` (open_time, prices o/h/l/c, anchors_<slice>).
"""

from __future__ import annotations

import json

import numpy as np

from libs.common.klines import INTERVAL_MS
from libs.common.model_package import TimeRange, code_version
from services.trainer.datasets import (
    MANIFEST_FILE,
    BuildSpec,
    DatasetError,
    DatasetKind,
    register_kind,
    split_fractions,
    split_masks,
    staged_folder,
    time_cuts,
)
from services.trainer.range_model import HAR_LAGS
from services.trainer.datasets.sequence import PRICE_NAMES, series_file, valid_anchors
from services.trainer.sources import SourceError, load_series

KIND = "range-vol"
SLICES = ("train", "validation", "gate", "test")
DEFAULT_LOOKBACK = 64
DEFAULT_VOL_HORIZON = 16
MIN_SAMPLES = {"train": 256, "validation": 64, "gate": 64, "test": 64}


def build(spec: BuildSpec) -> dict:
    lookback = spec.lookback or DEFAULT_LOOKBACK
    n_vol = spec.horizon or DEFAULT_VOL_HORIZON
    need = max(max(HAR_LAGS), n_vol + 1)
    if lookback < need or n_vol < 1:
        raise DatasetError(f"lookback {lookback} must hold at least {need} candles (the HAR's longest mean, "
                           f"horizon {n_vol} + 1 returns) and horizon must be at least 1")
    fractions = split_fractions(spec)
    if spec.out.exists() and any(spec.out.iterdir()):
        raise DatasetError(f"{spec.out} exists and is not empty; datasets are written once")
    try:
        series = load_series(spec.inputs, spec.symbols, spec.intervals, spec.start, spec.end)
    except SourceError as e:
        raise DatasetError(str(e)) from None
    per = {}
    for key, s in series.items():
        ot = s.frame["open_time"].to_numpy(np.int64)
        prices = s.frame[list(PRICE_NAMES)].to_numpy(np.float64)
        ok = np.isfinite(prices).all(axis=1) & (prices[:, 1] >= prices[:, 2]) & (prices[:, 3] > 0)
        anchors = valid_anchors(ot, np.where(ok[:, None], prices, np.nan), INTERVAL_MS[s.interval], lookback, n_vol)
        per[key] = (ot, prices, anchors)
    all_times = np.concatenate([ot[a] for ot, _, a in per.values()])
    if len(all_times) < sum(MIN_SAMPLES.values()):
        raise DatasetError(f"too little history: {len(all_times)} samples for lookback {lookback} + horizon {n_vol}")
    cuts = time_cuts(all_times, fractions)
    with staged_folder(spec.out) as tmp:
        counts = {k: 0 for k in SLICES}
        spans: dict[str, list[tuple[int, int]]] = {k: [] for k in SLICES}
        meta = []
        for (symbol, interval), (ot, prices, a) in sorted(per.items()):
            masks = split_masks(ot[a - lookback + 1], ot[a + n_vol], cuts, SLICES)
            sa = {k: a[m] for k, m in masks.items()}
            for k, anc in sa.items():
                counts[k] += len(anc)
                if len(anc):
                    spans[k].append((int(ot[anc[0] - lookback + 1]), int(ot[anc[-1] + n_vol])))
            np.savez(tmp / series_file(symbol, interval), open_time=ot, prices=prices,
                     **{f"anchors_{k}": v for k, v in sa.items()})
            s = series[(symbol, interval)]
            meta.append(dict(symbol=symbol, interval=interval, file=series_file(symbol, interval), candles=int(len(ot)),
                             first_open_time=int(ot[0]), last_open_time=int(ot[-1]),
                             samples={k: int(len(v)) for k, v in sa.items()},
                             sources=[dict(path=f.path, sha256=f.sha256) for f in s.sources]))
        short = [f"{k} {counts[k]} < {MIN_SAMPLES[k]}" for k in SLICES if counts[k] < MIN_SAMPLES[k]]
        if short:
            raise DatasetError(f"too little history: the time split leaves {', '.join(short)} samples; give a longer range")
        manifest = dict(
            format=1, kind=KIND, feature_set="", features=["high", "low", "close"], lookback=lookback,
            horizons=[1, n_vol], targets=["range", "rvol"], embargo=lookback + n_vol,
            cuts=dict(zip(("validation_start", "gate_start", "test_start"), cuts)),
            ranges={k: TimeRange(start=min(s for s, _ in spans[k]), end=max(e for _, e in spans[k]), rows=counts[k]).model_dump()
                    for k in SLICES},
            samples=counts, series=meta,
            spec=dict(inputs=spec.inputs, symbols=spec.symbols, intervals=spec.intervals, start=spec.start, end=spec.end,
                      train_fraction=fractions[0], validation_fraction=fractions[1], gate_fraction=fractions[2]),
            code_version=code_version(),
        )
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _train(dataset_dir, options, progress=None):
    from services.trainer.range_job import train_range

    return train_range(dataset_dir, options, progress)


register_kind(DatasetKind(
    name=KIND,
    description="next candle's range and realised volatility over the next N candles: HAR and EWMA models "
                "of log relative ranges (linear, tiny ONNX graph), beside persistence and EWMA",
    build=build, train=_train, default_feature_set="",
))
