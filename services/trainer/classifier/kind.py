"""Registers the ``chart-classifier`` dataset kind with the trainer (services/trainer/datasets).

``klinebus dataset build --kind chart-classifier --input K.csv.gz --symbol BTCUSDT --interval 1h
--start 2023-01-01 --window 30 --out DIR`` arrives here as a ``BuildSpec``; ``klinebus train
--dataset DIR`` calls ``train``. Extras (``BuildSpec.extra``): ``workers`` (render processes),
``stride``, ``neutral_atr_multiple``, ``renderer`` (a ``ChartRenderer``; default: the charts
renderer through libs.charting).
"""

from __future__ import annotations

from services.trainer.classifier.dataset import KIND, DatasetSpec, build_chart_dataset
from services.trainer.classifier.labels import NEUTRAL_ATR_MULTIPLE
from services.trainer.classifier.render import default_renderer
from services.trainer.datasets import BuildSpec, DatasetError, DatasetKind, register_kind
from services.trainer.sources import SourceError, load_series

DEFAULT_WINDOW = 30  # seed 001's --window


def build(spec: BuildSpec) -> dict:
    symbols, intervals = spec.symbols or [], spec.intervals or []
    if len(symbols) != 1 or len(intervals) != 1:
        raise DatasetError("a chart-classifier dataset holds one symbol and one interval (--symbol, --interval)")
    window = spec.lookback or DEFAULT_WINDOW
    try:
        # The whole history, not clipped to --start: candles before it warm the chart's moving
        # averages and the ATR of the neutral band.
        series = load_series(spec.inputs, symbols, intervals, None, None)
    except SourceError as e:
        raise DatasetError(str(e)) from None
    s = next(iter(series.values()))
    validation = spec.validation_fraction
    test = 1.0 - spec.train_fraction - validation
    dspec = DatasetSpec(
        symbol=s.symbol, interval=s.interval, window=window, start_ms=spec.start, end_ms=spec.end,
        stride=int(spec.extra.get("stride", 1)),
        neutral_atr_multiple=float(spec.extra.get("neutral_atr_multiple", NEUTRAL_ATR_MULTIPLE)),
        fractions=(spec.train_fraction, validation, test),
    )
    renderer = spec.extra.get("renderer") or default_renderer(window)
    summary = build_chart_dataset(
        s.frame, [{"path": f.path, "sha256": f.sha256} for f in s.sources], spec.out, dspec, renderer,
        workers=spec.extra.get("workers"), progress=bool(spec.extra.get("progress", False)),
    )
    return summary.manifest


def train(dataset_dir, options, progress=None):
    from services.trainer.classifier.jobs import train_job

    return train_job(dataset_dir, options, progress)


register_kind(DatasetKind(
    name=KIND,
    description="seed 001: 224 px charts + candle text, ViT patches attended by BERT [CLS], 3 classes + next close",
    build=build,
    train=train,
    default_feature_set="chart:classifier224",
))
