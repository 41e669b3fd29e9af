"""``klinebus dataset build --kind chart-classifier``: 224 px charts, their candle text and labels.

Output folder::

    manifest.json   what was built from what (spec, source files + sha256, class counts per
                    split, embargo, renderer), ``complete`` once every image exists
    index.csv       one row per chart, in time order: the seed's ``image_path,text,label,
                    next_close`` then symbol, interval, open_time (of the last candle),
                    first_open_time, close (the last candle's), last_label (the class of the
                    last candle's own move, the "same as last candle" baseline), split
    images/         SYMBOL-INTERVAL-<open_time of the last candle>.png

Resumable: the build runs in ``.<out>.partial`` beside ``out``; the index is written there
(atomically) before any image, images are written atomically by the render pool, and the same
build run again renders only the images that are missing; the folder is renamed to ``out`` once
every image exists. ``out`` is written once: a complete dataset of the same spec is returned as
it is, anything else there is refused.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from libs.common.klines import INTERVAL_MS
from libs.common.model_package import code_version
from libs.indicators.batch import compute_batch
from services.trainer.classifier.labels import (
    ATR_FEATURE,
    CLASS_NAMES,
    NEUTRAL_ATR_MULTIPLE,
    class_counts,
    classify_moves,
    neutral_band,
)
from services.trainer.classifier.render import ChartRenderer
from services.trainer.classifier.splits import DEFAULT_FRACTIONS, SPLITS, time_splits
from services.trainer.classifier.text import candle_text, text_spec
from services.trainer.datasets import DatasetError

KIND = "chart-classifier"
INDEX_COLUMNS = (
    "image_path", "text", "label", "next_close", "symbol", "interval", "open_time", "first_open_time", "close",
    "last_label", "split",
)
MANIFEST = "manifest.json"
INDEX = "index.csv"
IMAGES = "images"


@dataclass(frozen=True)
class DatasetSpec:
    symbol: str
    interval: str
    window: int = 30
    start_ms: int | None = None
    end_ms: int | None = None
    stride: int = 1
    neutral_atr_multiple: float = NEUTRAL_ATR_MULTIPLE
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS

    def check(self) -> "DatasetSpec":
        if self.interval not in INTERVAL_MS:
            raise DatasetError(f"unknown interval {self.interval!r}")
        if self.window < 2:
            raise DatasetError(f"window must be at least 2 candles, got {self.window}")
        if self.stride < 1:
            raise DatasetError(f"stride must be >= 1, got {self.stride}")
        if self.start_ms is not None and self.end_ms is not None and self.end_ms <= self.start_ms:
            raise DatasetError("end must be after start")
        return self

    def to_json(self) -> dict:
        d = asdict(self)
        d["fractions"] = list(self.fractions)
        return d


@dataclass
class BuildSummary:
    out: Path
    samples: int
    rendered: int  # images rendered by this run (0 when resuming a complete build)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class -> count
    embargoed: int = 0
    manifest: dict = field(default_factory=dict)


def plan_index(frame: pd.DataFrame, spec: DatasetSpec, warmup: int) -> tuple[pd.DataFrame, np.ndarray]:
    """The index rows (before splitting) and each one's row in ``frame``.

    A sample needs: its window's indicators warm (``warmup`` earlier candles), ATR at its last
    candle, a previous candle (for the last-candle class) and a next one (its label), and no
    missing candle anywhere from the window's first candle to the next one (a gap would draw a
    chart of candles that were not adjacent and label it with a move over a different span).
    """
    n = len(frame)
    t = frame["open_time"].to_numpy(np.int64)
    o, h, lo, c, v = (frame[k].to_numpy(np.float64) for k in ("open", "high", "low", "close", "volume"))
    atr = np.ascontiguousarray(compute_batch(o, h, lo, c, v, names=[ATR_FEATURE])[ATR_FEATURE])
    w = spec.window
    step_ok = np.diff(t) == INTERVAL_MS[spec.interval]
    bad_before = np.concatenate([[0], np.cumsum(~step_ok)])  # gaps among rows 0..j
    rows = np.arange(max(w - 1 + warmup, 1), n - 1)
    first = rows - w + 1
    ok = (bad_before[rows + 1] - bad_before[np.maximum(first, 0)]) == 0
    ok &= np.isfinite(atr[rows]) & (atr[rows] > 0)
    if spec.start_ms is not None:
        ok &= t[rows] >= spec.start_ms
    if spec.end_ms is not None:
        ok &= t[rows + 1] <= spec.end_ms  # the label candle too lies in the asked range (end inclusive)
    rows = rows[ok][:: spec.stride]
    if len(rows) == 0:
        raise DatasetError(
            f"{spec.symbol} {spec.interval}: no chart fits: {n} candles, a {w}-candle window needs "
            f"{w + warmup + 1} gap-free candles (with {warmup} of indicator warm-up and the next candle) in range"
        )
    band = neutral_band(c[rows], atr[rows], spec.neutral_atr_multiple)
    label = classify_moves(c[rows + 1] / c[rows] - 1.0, band)
    last_label = classify_moves(c[rows] / c[rows - 1] - 1.0, band)
    index = pd.DataFrame({
        "image_path": [f"{IMAGES}/{spec.symbol}-{spec.interval}-{ot}.png" for ot in t[rows]],
        "text": [candle_text(o[i], h[i], lo[i], c[i], v[i]) for i in rows],
        "label": label,
        "next_close": c[rows + 1],
        "symbol": spec.symbol,
        "interval": spec.interval,
        "open_time": t[rows],
        "first_open_time": t[rows - w + 1],
        "close": c[rows],
        "last_label": last_label,
    })
    return index, rows


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_chart_dataset(
    frame: pd.DataFrame,
    sources: Sequence[dict],
    out_dir: str | Path,
    spec: DatasetSpec,
    renderer: ChartRenderer,
    workers: int | None = None,
    progress: bool = False,
) -> BuildSummary:
    """Build (or resume building) the dataset of ``frame`` (one symbol and interval, sorted, whole
    history: candles before ``spec.start_ms`` warm the indicators) into ``out_dir``.

    The build happens in ``.<out>.partial`` beside ``out_dir`` and is renamed when every image is
    written, so ``out_dir`` is always a complete dataset; an interrupted build leaves the partial
    folder, and the same build run again continues there.
    """
    spec.check()
    if renderer.window != spec.window:
        raise DatasetError(f"renderer draws {renderer.window}-candle windows, the spec asks {spec.window}")
    final = Path(out_dir)
    out = final.parent / f".{final.name}.partial"
    index, rows = plan_index(frame, spec, renderer.warmup)
    try:
        plan = time_splits(rows, embargo_rows=spec.window + 1, fractions=spec.fractions)
    except ValueError as e:
        raise DatasetError(f"{spec.symbol} {spec.interval}: {e}") from None
    index["split"] = [SPLITS[k] if k >= 0 else "embargo" for k in plan.assignment]
    keep = plan.assignment >= 0
    index, rows = index[keep].reset_index(drop=True), rows[keep]
    counts = {s: class_counts(index.loc[index["split"] == s, "label"].to_numpy()) for s in SPLITS}

    manifest = {
        "kind": KIND,
        "spec": spec.to_json(),
        "sources": list(sources),
        "renderer": renderer.describe(),
        "text": text_spec(),
        "labels": {
            "classes": list(CLASS_NAMES),
            "rule": "r = next_close/close - 1 against band = neutral_atr_multiple * atr_14/close: "
                    "r < -band bearish, r > band bullish, else neutral",
        },
        "code_version": code_version(),
        "embargo_candles": plan.embargo_rows,
        "embargoed_samples": plan.embargoed,
        "samples": {s: int((index["split"] == s).sum()) for s in SPLITS},
        "class_counts": counts,
        "time_ranges": {
            s: [int(index.loc[index["split"] == s, "open_time"].min()), int(index.loc[index["split"] == s, "open_time"].max())]
            for s in SPLITS
        },
    }
    identity = ("kind", "spec", "sources", "renderer")
    if final.exists() and any(final.iterdir()):
        old = _read_json(final / MANIFEST)
        if old and old.get("complete") and {k: old.get(k) for k in identity} == {k: manifest[k] for k in identity}:
            return BuildSummary(out=final, samples=sum(old["samples"].values()), rendered=0, counts=old["class_counts"],
                                embargoed=old["embargoed_samples"], manifest=old)
        raise DatasetError(f"{final} exists and holds something else; datasets are written once (use another --out)")
    out.mkdir(parents=True, exist_ok=True)
    (out / IMAGES).mkdir(exist_ok=True)
    old_path = out / MANIFEST
    old = _read_json(old_path)
    if old is not None and {k: old.get(k) for k in identity} != {k: manifest[k] for k in identity}:
        shutil.rmtree(out)  # an unfinished build of another spec: nothing of it can be reused
        (out / IMAGES).mkdir(parents=True)
    for stray in (out / IMAGES).glob("*.tmp*"):
        stray.unlink(missing_ok=True)  # a render interrupted mid-write
    _write_atomic(old_path, json.dumps({**manifest, "complete": False}, indent=2))
    buf = index.loc[:, list(INDEX_COLUMNS)].to_csv(index=False, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
    _write_atomic(out / INDEX, buf)

    missing = [(int(r), str(out / p)) for r, p in zip(rows, index["image_path"]) if not (out / p).exists()]
    rendered = 0
    bar = _progress(progress, f"{spec.symbol} {spec.interval} charts", len(missing))
    try:
        for _ in renderer.render(frame, spec.symbol, spec.interval, missing, workers):
            rendered += 1
            if bar is not None:
                bar[0].advance(bar[1])
    finally:
        if bar is not None:
            bar[0].stop()
    missing_after = [p for p in index["image_path"] if not (out / p).exists()]
    if missing_after:
        raise DatasetError(f"{len(missing_after)} charts were not rendered (first: {missing_after[0]}); run the build again")
    manifest["complete"] = True
    _write_atomic(old_path, json.dumps(manifest, indent=2))
    if final.exists():
        final.rmdir()  # empty (checked above)
    out.rename(final)
    return BuildSummary(out=final, samples=len(index), rendered=rendered, counts=counts, embargoed=plan.embargoed,
                        manifest=manifest)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _progress(enabled: bool, what: str, total: int):
    if not enabled or total == 0:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    p = Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    p.start()
    return p, p.add_task("render", total=total)


def load_index(dataset_dir: str | Path) -> pd.DataFrame:
    """The index of a complete dataset (``DatasetError`` if it is absent or unfinished)."""
    d = Path(dataset_dir)
    try:
        manifest = json.loads((d / MANIFEST).read_text())
    except FileNotFoundError:
        raise DatasetError(f"{d}: not a chart-classifier dataset (no {MANIFEST})") from None
    if manifest.get("kind") != KIND:
        raise DatasetError(f"{d}: dataset kind is {manifest.get('kind')!r}, not {KIND!r}")
    if not manifest.get("complete"):
        raise DatasetError(f"{d}: the build did not finish; rerun the same dataset build to resume it")
    index = pd.read_csv(d / INDEX, dtype={"text": str, "symbol": str, "interval": str, "split": str})
    missing = set(INDEX_COLUMNS) - set(index.columns)
    if missing:
        raise DatasetError(f"{d / INDEX}: missing columns {sorted(missing)}")
    return index


def load_manifest(dataset_dir: str | Path) -> dict:
    return json.loads((Path(dataset_dir) / MANIFEST).read_text())
