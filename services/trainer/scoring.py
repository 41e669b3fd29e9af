"""``klinebus evaluate``: score a published package on kline files, beside the same baselines.

The package is verified first (sha256, graph names); features come from libs/indicators with the
package's feature list; by default only windows that start after the package's validation slice
count, so a model is never scored on candles it was trained or selected on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from libs.common.klines import INTERVAL_MS
from libs.common.model_package import MODEL_FILE, ModelPackage, verify_package
from libs.indicators.batch import compute_frame
from services.trainer.datasets.sequence import PRICE_NAMES, valid_anchors
from services.trainer.evaluation import forecast_scorecard, walk_forward
from services.trainer.sources import load_series

ONNX_BATCH = 1024


class ScoringError(ValueError):
    pass


def score_package(package_dir: str | Path, inputs: list[str], include_seen: bool = False, folds: int = 3) -> dict:
    import onnxruntime as ort

    meta: ModelPackage = verify_package(package_dir)
    if meta.kind == "range-vol":
        return score_range_package(package_dir, meta, inputs, include_seen)
    if meta.input_scaling != "in-graph" or len(meta.inputs) != 1:
        raise ScoringError(f"{package_dir}: klinebus evaluate scores forecasters that take one raw feature window")
    L, H, T = meta.lookback, len(meta.horizons), len(meta.targets)
    hmax = meta.horizons[-1]
    sess = ort.InferenceSession(str(Path(package_dir) / MODEL_FILE), providers=["CPUExecutionProvider"])
    wanted = [(s.symbol, s.interval) for s in meta.serves]
    series = load_series(inputs, sorted({s for s, _ in wanted}), sorted({i for _, i in wanted}), with_hashes=False)
    series = {k: v for k, v in series.items() if k in wanted}
    if not series:
        raise ScoringError(f"{' '.join(inputs)} holds none of the pairs {meta.name} serves ({wanted})")
    drift = np.asarray(meta.scalers["targets"].center).reshape(H, T)
    up_share = float(meta.config.get("train_up_share", 0.5))
    preds, actual, last, times, skipped_seen = [], [], [], [], 0
    for (symbol, interval), s in sorted(series.items()):
        feats = compute_frame(s.frame, meta.features, interval_ms=INTERVAL_MS[interval], allow_gaps=True)[meta.features].to_numpy(np.float64)
        prices = s.frame[list(PRICE_NAMES)].to_numpy(np.float64)
        ot = s.frame["open_time"].to_numpy(np.int64)
        anchors = valid_anchors(ot, feats, INTERVAL_MS[interval], L, hmax)
        if not include_seen:
            unseen = ot[anchors - L + 1] > meta.ranges.validation.end
            skipped_seen += int((~unseen).sum())
            anchors = anchors[unseen]
        for i in range(0, len(anchors), ONNX_BATCH):
            a = anchors[i : i + ONNX_BATCH]
            windows = feats[a[:, None] + np.arange(-L + 1, 1)[None, :]]
            preds.append(sess.run(None, {meta.inputs[0].name: windows})[0])
            actual.append(np.stack([prices[a + h] for h in meta.horizons], axis=1)[:, :, [PRICE_NAMES.index(t) for t in meta.targets]])
            last.append(prices[a])
            times.append(ot[a])
    if not preds:
        raise ScoringError(
            f"no windows to score: {skipped_seen} fall in the model's train/validation range (use --include-seen to score them anyway)"
            if skipped_seen else f"too little history in {' '.join(inputs)} for lookback {L} + horizon {hmax}"
        )
    pred, act, lastp, t = (np.concatenate(x) for x in (preds, actual, last, times))

    def card(idx: np.ndarray | None = None) -> dict:
        if idx is None:
            return forecast_scorecard(pred, act, lastp, meta.targets, meta.horizons, drift, up_share)
        return forecast_scorecard(pred[idx], act[idx], lastp[idx], meta.targets, meta.horizons, drift, up_share)

    return dict(
        model=meta.name, version=meta.version, promoted=meta.promoted, samples=int(len(pred)),
        skipped_seen=skipped_seen, start=int(t.min()), end=int(t.max()),
        scorecard=card(), folds=walk_forward(t, folds, card),
    )


def score_range_package(package_dir: str | Path, meta: ModelPackage, inputs: list[str], include_seen: bool = False) -> dict:
    """A ``range-vol`` package on kline files: next-range and realised-vol MAE beside persistence and
    EWMA on the same windows, paired DM verdicts, and the coverage of its 80 % band."""
    import onnxruntime as ort

    from services.trainer.evaluation import interval_report, paired_verdict
    from services.trainer.range_model import baselines, targets

    L, n_vol = meta.lookback, meta.horizons[1]
    sess = ort.InferenceSession(str(Path(package_dir) / MODEL_FILE), providers=["CPUExecutionProvider"])
    wanted = [(s.symbol, s.interval) for s in meta.serves]
    series = load_series(inputs, sorted({s for s, _ in wanted}), sorted({i for _, i in wanted}), with_hashes=False)
    series = {k: v for k, v in series.items() if k in wanted}
    if not series:
        raise ScoringError(f"{' '.join(inputs)} holds none of the pairs {meta.name} serves ({wanted})")
    f_all, q_all, y_all, b_all, skipped = [], [], [], {"persistence": [], "ewma": []}, 0
    for (symbol, interval), s in sorted(series.items()):
        prices = s.frame[list(PRICE_NAMES)].to_numpy(np.float64)
        ot = s.frame["open_time"].to_numpy(np.int64)
        anchors = valid_anchors(ot, prices, INTERVAL_MS[interval], L, n_vol)
        if not include_seen:
            unseen = ot[anchors - L + 1] > meta.ranges.validation.end
            skipped += int((~unseen).sum())
            anchors = anchors[unseen]
        if not len(anchors):
            continue
        hlc = prices[anchors[:, None] + np.arange(-L + 1, 1)[None, :]][:, :, 1:4]
        f, q = sess.run(None, {meta.inputs[0].name: hlc})
        f_all.append(f), q_all.append(q), y_all.append(targets(prices, anchors, n_vol))
        for k, v in baselines(hlc, n_vol).items():
            b_all[k].append(v)
    if not f_all:
        raise ScoringError(f"no windows to score ({skipped} fall in the model's train/validation/gate range)")
    f, q, y = np.concatenate(f_all), np.concatenate(q_all), np.concatenate(y_all)
    base = {k: np.concatenate(v) for k, v in b_all.items()}
    names = ["range@1", f"rvol@{n_vol}"]
    verdicts = {f"{t}:{b}": paired_verdict(f[:, j] - y[:, j], base[b][:, j] - y[:, j], t, baseline=b, h=h)
                for j, (t, h) in enumerate(zip(names, (1, n_vol))) for b in base}
    intervals = {t: interval_report(y[:, j], q[:, j, 0], q[:, j, 2], f[:, j]) for j, t in enumerate(names)}
    return dict(model=meta.name, version=meta.version, promoted=meta.promoted, samples=int(len(f)),
                skipped_seen=skipped, verdicts=verdicts, intervals=intervals)
