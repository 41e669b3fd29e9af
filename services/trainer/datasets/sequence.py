"""Sequence datasets for the seeds' forecasters: ``bilstm-ohlc`` (seed 002) and ``lstm-close`` (seed 004).

A sample is anchored at a closed candle ``i``: its input is the feature rows ``i-lookback+1 .. i``
(features from libs/indicators' batch engine, the kernels serving runs), its targets the log
returns ``log(price[i+h] / close[i])`` for each horizon ``h`` and target price. Forecasting returns
against the last close, not price levels, keeps the target on one scale across years of prices;
the exported graph turns them back into prices.

Splits are by time over all series together (train, validation, gate, test), so a unified
model never trains on a period another of its series is tested on. Early stopping and LR decay
use validation; promotion is decided on the gate slice (never tuned on); test only confirms. A train sample's targets all lie
before the validation cut and a validation sample's inputs all after it (the same at the test
cut): ``lookback + max(horizon)`` anchors at least between the slices, nothing shared.
A window that spans a gap in the candles is dropped. Scalers are fitted on the train slice only.

No train/serve origin skew: features are computed from the first candle the source holds (the
archive's first candle, where serving's history starts too), never from ``--start``; ``--start``
only says where the first *window* may begin. Cumulative features (OBV, VPT) would still depend on
that origin, so it is recorded per series (``feature_origin``) with the list of cumulative
features the dataset holds; ``lstm-close`` defaults to ``lstm-35-v2``, which has none.

Folder layout::

    manifest.json                      what ``DatasetManifest`` holds
    series-<SYMBOL>-<interval>.npz     open_time, features (raw float64), prices (open, high, low,
                                       close), anchors_train / anchors_validation / anchors_test
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from libs.common.klines import INTERVAL_MS
from libs.common.model_package import Scaler, TimeRange, code_version
from libs.indicators.batch import compute_frame
from libs.indicators.catalog import LOOKBACK
from libs.indicators.feature_sets import UnknownFeatureSet, get_feature_set
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
from services.trainer.sources import SourceError, load_series

SPLITS = ("train", "validation", "gate", "test")
# Features whose value at a candle depends on every candle since the computation started.
CUMULATIVE_FEATURES = frozenset({"obv", "vpt"})
PRICE_NAMES = ("open", "high", "low", "close")
TARGET_TRANSFORM = "log_return_vs_last_close"
# A feature whose warm-up takes more than this share of the shortest series is left out (seed 004:
# "features lacking enough history skipped"), and the skip is recorded with its reason.
MAX_WARMUP_SHARE = 0.25
# Fewer samples than this in a slice cannot train or judge anything.
MIN_SAMPLES = {"train": 64, "validation": 16, "gate": 16, "test": 16}


@dataclass(frozen=True)
class SequenceKindSpec:
    feature_set: str
    targets: tuple[str, ...]
    lookback: int
    steps: int  # default number of consecutive horizons 1..steps
    scaler: str


SEQUENCE_KINDS = {
    # Seed 002: 60 x 13 inputs, four heads in its order (open, close, high, low), next candle.
    "bilstm-ohlc": SequenceKindSpec("bilstm-13-v1", ("open", "close", "high", "low"), 60, 1, "minmax"),
    # Seed 004: lookback 60, the 35+ feature set (v2: without the cumulative OBV and VPT), the next 7 closes.
    "lstm-close": SequenceKindSpec("lstm-35-v2", ("close",), 60, 7, "minmax"),
}


def series_file(symbol: str, interval: str) -> str:
    return f"series-{symbol}-{interval}.npz"


def _fit_scaler(kind: str, columns: list[str], values: np.ndarray) -> Scaler:
    if kind == "minmax":
        lo, hi = np.nanmin(values, axis=0), np.nanmax(values, axis=0)
        center, scale = lo, hi - lo
    else:
        center, scale = np.nanmean(values, axis=0), np.nanstd(values, axis=0)
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
    return Scaler(kind=kind, columns=columns, center=[float(c) for c in center], scale=[float(s) for s in scale])


def apply_scaler(s: Scaler, values: np.ndarray) -> np.ndarray:
    return (values - np.asarray(s.center)) / np.asarray(s.scale)


def targets_for(prices: np.ndarray, anchors: np.ndarray, horizons: list[int], targets: list[str]) -> np.ndarray:
    """``[n, len(horizons), len(targets)]`` log returns of each target price against the anchor's close."""
    close = prices[anchors, PRICE_NAMES.index("close")]
    cols = [PRICE_NAMES.index(t) for t in targets]
    out = np.empty((len(anchors), len(horizons), len(targets)))
    for k, h in enumerate(horizons):
        out[:, k, :] = np.log(prices[anchors + h][:, cols] / close[:, None])
    return out


def _skipped_features(features: tuple[str, ...], shortest: int) -> dict[str, str]:
    limit = int(shortest * MAX_WARMUP_SHARE)
    return {
        f: f"needs {LOOKBACK[f]} candles of warm-up, more than {MAX_WARMUP_SHARE:.0%} of the shortest series ({shortest})"
        for f in features if LOOKBACK[f] > limit
    }


def valid_anchors(open_time: np.ndarray, feats: np.ndarray, step: int, lookback: int, hmax: int) -> np.ndarray:
    n = len(open_time)
    idx = np.arange(n)
    bad_row = ~np.isfinite(feats).all(axis=1)
    bad_cum = np.concatenate([[0], np.cumsum(bad_row)])
    seg = np.concatenate([[0], np.cumsum(np.diff(open_time) != step)])
    lo, hi = idx - lookback + 1, idx + hmax
    ok = (lo >= 0) & (hi <= n - 1)
    lo_c, hi_c = np.clip(lo, 0, n - 1), np.clip(hi, 0, n - 1)
    ok &= bad_cum[idx + 1] - bad_cum[lo_c] == 0  # no NaN in the input window
    ok &= seg[lo_c] == seg[hi_c]  # no gap between the first input and the last target
    return idx[ok]


def build(spec: BuildSpec) -> dict:
    kind = SEQUENCE_KINDS[spec.kind]
    try:
        fset = get_feature_set(spec.feature_set or kind.feature_set)
    except UnknownFeatureSet as e:
        raise DatasetError(str(e)) from None
    lookback = spec.lookback or kind.lookback
    steps = spec.horizon or kind.steps
    if lookback < 1 or steps < 1:
        raise DatasetError("lookback and horizon must be at least 1")
    horizons = list(range(1, steps + 1))
    hmax = horizons[-1]
    targets = list(kind.targets)
    if spec.out.exists() and any(spec.out.iterdir()):
        raise DatasetError(f"{spec.out} exists and is not empty; datasets are written once")
    fractions = split_fractions(spec)
    try:
        # From the source's first candle (not spec.start): features then equal serving's.
        series = load_series(spec.inputs, spec.symbols, spec.intervals, None, spec.end)
    except SourceError as e:
        raise DatasetError(str(e)) from None

    shortest = min(len(s.frame) for s in series.values())
    skipped = _skipped_features(fset.features, shortest)
    features = [f for f in fset.features if f not in skipped]
    warmup = max((LOOKBACK[f] for f in features), default=0)

    per: dict[tuple[str, str], dict] = {}
    for key, s in series.items():
        frame = s.frame
        step = INTERVAL_MS[s.interval]
        try:
            feats = compute_frame(frame, features, interval_ms=step, allow_gaps=True)[features].to_numpy(np.float64)
        except ValueError as e:
            raise DatasetError(f"{key[0]} {key[1]}: {e}") from None
        ot = frame["open_time"].to_numpy(np.int64)
        prices = frame[list(PRICE_NAMES)].to_numpy(np.float64)
        anchors = valid_anchors(ot, feats, step, lookback, hmax)
        if spec.start is not None:
            anchors = anchors[ot[anchors - lookback + 1] >= spec.start]
        per[key] = dict(open_time=ot, features=feats, prices=prices, anchors=anchors)

    need = warmup + lookback + hmax
    all_times = np.concatenate([p["open_time"][p["anchors"]] for p in per.values()])
    total = len(all_times)
    if total < sum(MIN_SAMPLES.values()) * 2:
        have = ", ".join(f"{k[0]} {k[1]}: {len(p['open_time'])} candles" for k, p in per.items())
        raise DatasetError(
            f"too little history for lookback {lookback} + horizon {hmax} + warm-up {warmup} "
            f"(each sample needs {need} consecutive candles; {have} give {total} samples)"
        )
    cuts = time_cuts(all_times, fractions)

    with staged_folder(spec.out) as tmp:
        split_anchor_times: dict[str, list[np.ndarray]] = {k: [] for k in SPLITS}
        split_spans: dict[str, list[tuple[int, int]]] = {k: [] for k in SPLITS}
        series_meta = []
        train_rows, train_targets = [], []
        for (symbol, interval), p in sorted(per.items()):
            ot, a = p["open_time"], p["anchors"]
            first_in, last_out = ot[a - lookback + 1], ot[a + hmax]
            masks = split_masks(first_in, last_out, cuts, SPLITS)
            split_anchors = {k: a[m] for k, m in masks.items()}
            for k, anc in split_anchors.items():
                if len(anc):
                    split_anchor_times[k].append(ot[anc])
                    split_spans[k].append((int(ot[anc[0] - lookback + 1]), int(ot[anc[-1] + hmax])))
            if len(split_anchors["train"]):
                a_tr = split_anchors["train"]
                train_rows.append(p["features"][a_tr[0] - lookback + 1 : a_tr[-1] + 1])
                train_targets.append(targets_for(p["prices"], split_anchors["train"], horizons, targets))
            np.savez(
                tmp / series_file(symbol, interval),
                open_time=ot, features=p["features"], prices=p["prices"],
                **{f"anchors_{k}": v for k, v in split_anchors.items()},
            )
            s = series[(symbol, interval)]
            series_meta.append(dict(
                symbol=symbol, interval=interval, file=series_file(symbol, interval), candles=int(len(ot)),
                first_open_time=int(ot[0]), last_open_time=int(ot[-1]), feature_origin=int(ot[0]),
                samples={k: int(len(v)) for k, v in split_anchors.items()},
                sources=[dict(path=f.path, sha256=f.sha256) for f in s.sources],
            ))
        counts = {k: int(sum(len(t) for t in split_anchor_times[k])) for k in SPLITS}
        short = [f"{k} {counts[k]} < {MIN_SAMPLES[k]}" for k in SPLITS if counts[k] < MIN_SAMPLES[k]]
        if short:
            raise DatasetError(
                f"too little history: the time split leaves {', '.join(short)} samples "
                f"(lookback {lookback}, horizon {hmax}, warm-up {warmup}); give a longer range"
            )
        ranges = {
            k: TimeRange(start=min(s for s, _ in split_spans[k]), end=max(e for _, e in split_spans[k]), rows=counts[k]).model_dump()
            for k in SPLITS
        }
        x_scaler = _fit_scaler(kind.scaler, features, np.concatenate(train_rows))
        tcols = [f"{t}@{h}" for h in horizons for t in targets]
        y_train = np.concatenate(train_targets).reshape(-1, len(tcols))
        y_scaler = _fit_scaler("standard", tcols, y_train)
        manifest = dict(
            format=1,
            kind=spec.kind,
            feature_set=fset.id,
            features=features,
            skipped_features=skipped,
            feature_warmup=warmup,
            lookback=lookback,
            horizons=horizons,
            targets=targets,
            target_transform=TARGET_TRANSFORM,
            embargo=lookback + hmax,
            cuts=dict(zip(("validation_start", "gate_start", "test_start"), (int(c) for c in cuts))),
            cumulative_features=sorted(CUMULATIVE_FEATURES & set(features)),
            feature_origin="first candle of the source per series (series[].feature_origin); start only clips windows",
            ranges=ranges,
            samples=counts,
            scalers=dict(inputs=x_scaler.model_dump(), targets=y_scaler.model_dump()),
            drift=dict(zip(tcols, (float(v) for v in y_train.mean(axis=0)))),
            series=series_meta,
            spec=dict(
                inputs=spec.inputs, symbols=spec.symbols, intervals=spec.intervals, start=spec.start, end=spec.end,
                train_fraction=fractions[0], validation_fraction=fractions[1], gate_fraction=fractions[2],
            ),
            code_version=code_version(),
        )
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


@dataclass
class SplitArrays:
    """One split of a sequence dataset, every series stacked; windows gathered on demand."""

    features: np.ndarray  # [rows, F] scaled float32, all series one after another
    anchors: np.ndarray  # [n] rows (into features) of each sample's last input candle
    targets: np.ndarray  # [n, H, T] raw log returns
    last_close: np.ndarray  # [n] close at the anchor
    last_prices: np.ndarray  # [n, 4] open, high, low, close of the anchor candle
    future_prices: np.ndarray  # [n, H, 4] the candles each horizon refers to
    anchor_time: np.ndarray  # [n] open time of the anchor candle
    series_id: np.ndarray  # [n] index into SequenceDataset.series
    raw_features: np.ndarray  # [rows, F] unscaled float64 (what the exported graph takes)

    def __len__(self) -> int:
        return len(self.anchors)

    def window_index(self, idx: np.ndarray, lookback: int) -> np.ndarray:
        return self.anchors[idx][:, None] + np.arange(-lookback + 1, 1)[None, :]

    def subset(self, idx: np.ndarray) -> SplitArrays:
        return SplitArrays(
            self.features, self.anchors[idx], self.targets[idx], self.last_close[idx], self.last_prices[idx],
            self.future_prices[idx], self.anchor_time[idx], self.series_id[idx], self.raw_features,
        )


class SequenceDataset:
    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.manifest = json.loads((self.dir / MANIFEST_FILE).read_text())
        m = self.manifest
        self.lookback: int = m["lookback"]
        self.horizons: list[int] = m["horizons"]
        self.targets: list[str] = m["targets"]
        self.features: list[str] = m["features"]
        self.x_scaler = Scaler(**m["scalers"]["inputs"])
        self.y_scaler = Scaler(**m["scalers"]["targets"])
        self.series = [(s["symbol"], s["interval"]) for s in m["series"]]
        self._npz = [np.load(self.dir / s["file"]) for s in m["series"]]

    def split(self, name: str) -> SplitArrays:
        feats, raw, anchors, ys, lc, lp, fp, at, sid = [], [], [], [], [], [], [], [], []
        offset = 0
        for k, z in enumerate(self._npz):
            f, prices, ot = z["features"], z["prices"], z["open_time"]
            if f"anchors_{name}" not in z:
                raise DatasetError(f"{self.dir}: no {name!r} slice (built before the gate slice existed); rebuild it")
            a = z[f"anchors_{name}"]
            raw.append(f)
            feats.append(apply_scaler(self.x_scaler, np.nan_to_num(f)).astype(np.float32))
            anchors.append(a + offset)
            ys.append(targets_for(prices, a, self.horizons, self.targets))
            lc.append(prices[a, PRICE_NAMES.index("close")])
            lp.append(prices[a])
            fp.append(np.stack([prices[a + h] for h in self.horizons], axis=1) if len(a) else np.zeros((0, len(self.horizons), 4)))
            at.append(ot[a])
            sid.append(np.full(len(a), k))
            offset += len(f)
        return SplitArrays(
            np.concatenate(feats), np.concatenate(anchors).astype(np.int64), np.concatenate(ys),
            np.concatenate(lc), np.concatenate(lp), np.concatenate(fp), np.concatenate(at),
            np.concatenate(sid), np.concatenate(raw),
        )

    def scale_targets(self, y: np.ndarray) -> np.ndarray:
        flat = y.reshape(len(y), -1)
        return apply_scaler(self.y_scaler, flat).reshape(y.shape).astype(np.float32)

    def unscale_targets(self, y_scaled: np.ndarray) -> np.ndarray:
        flat = y_scaled.reshape(len(y_scaled), -1)
        return (flat * np.asarray(self.y_scaler.scale) + np.asarray(self.y_scaler.center)).reshape(y_scaled.shape)


def _train(dataset_dir, options, progress=None):
    from services.trainer.jobs import train_sequence

    return train_sequence(dataset_dir, options, progress)


for _name in SEQUENCE_KINDS:
    register_kind(DatasetKind(
        name=_name,
        description={"bilstm-ohlc": "seed 002: BiLSTM next-candle open/close/high/low, 60 x bilstm-13-v1",
                     "lstm-close": "seed 004: LSTM next 7 closes, 60 x lstm-35-v2 (long warm-ups skipped)"}[_name],
        build=build,
        train=_train,
        default_feature_set=SEQUENCE_KINDS[_name].feature_set,
    ))
