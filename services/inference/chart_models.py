"""The chart classifier (seed 001) served on ``charts.v1``: a chart PNG and its last candle's text
in, class probabilities (bearish / neutral / bullish) and the next close out.

A package of kind ``chart-classifier`` (services/trainer/classifier) takes three inputs: ``image``
uint8 [batch, H, W, 3], ``input_ids`` and ``attention_mask`` int64 [batch, max_tokens]; its
``tokenizer/`` folder tokenises the text; ``config.text`` says how the text is written and
``config.chart.preset`` which charts it reads; ``scalers.next_close`` turns the scaled output back
into a price. Everything comes from the package; the text and image rules are
``libs.charting.classifier_input``, the code the trainer built its dataset with.

Pure domain: no bus. Package problems are ``PackageError`` (one line); a chart that cannot be fed
is ``ChartImageError``.

``ChartModel.predict_many`` answers many charts with one session call (images stacked, texts
padded to the graph's token axis together); ``services.inference.batching.ChartBatcher`` gathers
charts into such calls, as the ``MicroBatcher`` does windows for the forecasters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from libs.charting.classifier_input import ChartImageError, candle_text, load_chart, tokenize
from libs.common import model_package as mp
from libs.common.model_package import PackageError

__all__ = ["CHART_KIND", "NotAChartClassifier", "ChartSpec", "ChartModel", "ChartForecast", "ChartImageError", "chart_spec", "load_chart_package",
           "registry_chart_packages"]

CHART_KIND = "chart-classifier"
INPUTS = ("image", "input_ids", "attention_mask")
OUTPUTS = ("probabilities", "next_close_scaled")
DEFAULT_CLASSES = ("bearish", "neutral", "bullish")  # the trainer's labels 0/1/2
Candle = tuple[float, float, float, float, float]  # open, high, low, close, volume


class NotAChartClassifier(PackageError):
    """A sound package of another kind (not an error of the package)."""


@dataclass(frozen=True)
class ChartSpec:
    name: str
    version: str
    pairs: frozenset[tuple[str, str]] | None
    preset: str  # the charts.v1 preset the model reads ("" : any)
    image_size: int
    max_tokens: int
    text: dict
    classes: tuple[str, ...]
    scale: float  # next_close = close * (1 + y * scale)
    sha256: str
    promoted: bool
    folder: Path
    meta: Any = field(default=None, compare=False, repr=False)

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"

    def serves(self, symbol: str, interval: str) -> bool:
        return self.pairs is None or (symbol, interval) in self.pairs


def is_chart_classifier(meta: mp.ModelPackage) -> bool:
    return meta.kind == CHART_KIND or [i.name for i in meta.inputs] == list(INPUTS)


def chart_spec(meta: mp.ModelPackage, folder: Path | str) -> ChartSpec:
    """The serving view of a verified chart-classifier package; ``PackageError`` when it lacks
    what serving needs (inputs, outputs, tokenizer, scaler)."""
    folder = Path(folder)
    label = f"{meta.name}@{meta.version}"
    if not is_chart_classifier(meta):
        raise NotAChartClassifier(f"{label} ({meta.kind}) is not a chart classifier")
    ins = {i.name: i for i in meta.inputs}
    if [i.name for i in meta.inputs] != list(INPUTS):
        raise PackageError(f"{label}: inputs {[i.name for i in meta.inputs]}, a chart classifier takes {list(INPUTS)}")
    img = ins["image"]
    if img.dtype != "uint8" or len(img.shape) != 4 or img.shape[3] != 3 or img.shape[1] != img.shape[2] \
            or not isinstance(img.shape[1], int):
        raise PackageError(f"{label}: input image is {img.dtype}{img.shape}; serving feeds uint8 [batch, N, N, 3]")
    ids = ins["input_ids"]
    if ids.dtype != "int64" or ins["attention_mask"].dtype != "int64" or len(ids.shape) != 2 \
            or not isinstance(ids.shape[1], int):
        raise PackageError(f"{label}: token inputs must be int64 [batch, max_tokens]")
    outs = [o.name for o in meta.outputs]
    if outs != list(OUTPUTS):
        raise PackageError(f"{label}: outputs {outs}, a chart classifier answers {list(OUTPUTS)}")
    text = dict(meta.config.get("text") or {})
    if not text.get("template"):
        raise PackageError(f"{label}: config.text has no template: the candle text cannot be written as in training")
    tok = mp.inside(folder, str(text.get("tokenizer") or "tokenizer/"))  # a path the package names stays in it
    if not tok.is_dir() or not any(tok.iterdir()):
        raise PackageError(f"{label}: no tokenizer in the package ({tok.name}/ missing or empty)")
    scaler = meta.scalers.get("next_close")
    if scaler is None or not scaler.scale or not math.isfinite(scaler.scale[0]) or scaler.scale[0] <= 0:
        raise PackageError(f"{label}: scalers.next_close is missing or not a positive scale")
    classes = tuple(str(c) for c in (meta.config.get("labels") or {}).get("classes") or DEFAULT_CLASSES)
    if len(classes) != 3:
        raise PackageError(f"{label}: {len(classes)} classes named; the graph answers 3")
    return ChartSpec(
        name=meta.name, version=meta.version,
        pairs=frozenset((s.symbol, s.interval) for s in meta.serves) or None,
        preset=str((meta.config.get("chart") or {}).get("preset") or ""),
        image_size=int(img.shape[1]), max_tokens=int(ids.shape[1]), text=text, classes=classes,
        scale=float(scaler.scale[0]), sha256=mp.package_digest(folder), promoted=meta.promoted, folder=folder, meta=meta,
    )


def load_chart_package(uri: str, expected_sha256: str | None, cache_dir: Path | str) -> ChartSpec:
    if expected_sha256 or isinstance(cache_dir, mp.Sources):
        folder, meta = mp.fetch_package(uri, expected_sha256 or "", cache_dir)
    else:
        folder, meta = Path(uri), mp.verify_package(uri)
    return chart_spec(meta, folder)


def registry_chart_packages(root: Path | str, promoted_only: bool = True) -> list[ChartSpec]:
    """The newest (promoted) version of every chart classifier in a local registry."""
    reg = mp.Registry(str(root))
    found = []
    for name in reg.models():
        try:
            version = reg.latest(name, promoted_only=promoted_only)
            if version is None:
                continue
            meta = reg.verify(name, version)
            if is_chart_classifier(meta):
                found.append(chart_spec(meta, reg.path(name, version)))
        except PackageError:
            continue
    return found


@dataclass(frozen=True)
class ChartForecast:
    probabilities: dict[str, float]
    predicted_class: str
    next_close: float
    text: str


class ChartModel:
    """An onnxruntime session and the package's tokenizer (blocking: load and run in a thread)."""

    def __init__(self, spec: ChartSpec, threads: int = 1) -> None:
        import onnxruntime as ort

        self.spec = spec
        try:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(
                str(mp.inside(spec.folder, str(spec.text.get("tokenizer") or "tokenizer/"))), local_files_only=True)
        except (OSError, ValueError, TypeError) as exc:
            raise PackageError(f"{spec.label}: cannot load its tokenizer: {_line(exc)}") from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(spec.folder / mp.MODEL_FILE), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise PackageError(f"{spec.label}: onnxruntime cannot load {mp.MODEL_FILE}: {_line(exc)}") from None
        have = [i.name for i in self.session.get_inputs()]
        if have != list(INPUTS):
            raise PackageError(f"{spec.label}: graph inputs {have} != manifest's {list(INPUTS)}")

    def warm(self) -> None:
        """One call on a blank chart, so a graph that cannot run its declared shapes fails before it serves."""
        n = self.spec.image_size
        try:
            self.run(np.zeros((n, n, 3), dtype=np.uint8), (1.0, 1.0, 1.0, 1.0, 1.0))
        except (ValueError, RuntimeError) as exc:
            raise PackageError(f"{self.spec.label}: warm-up: {_line(exc)}") from None

    def predict(self, png: bytes, candle: Candle, where: str = "chart") -> ChartForecast:
        """``candle``: the chart's last candle (open, high, low, close, volume)."""
        return self.run(load_chart(png, self.spec.image_size, where), candle)

    def run(self, image: np.ndarray, candle: Candle) -> ChartForecast:
        (answer,) = self.run_many(image[None], [candle])
        if isinstance(answer, Exception):
            raise answer
        return answer

    def predict_many(self, charts: Sequence[tuple[bytes, Candle, str]]) -> list[ChartForecast | Exception]:
        """Many charts ``(png, candle, where)`` in one session call: per chart, in order, its forecast
        or its error (``ChartImageError`` for a chart that cannot be fed, which leaves the others in
        the batch; a session that fails is that error for every chart of the call)."""
        out: list[ChartForecast | Exception | None] = [None] * len(charts)
        images, candles, at = [], [], []
        for i, (png, candle, where) in enumerate(charts):
            try:
                images.append(load_chart(png, self.spec.image_size, where))
            except ChartImageError as exc:
                out[i] = exc
                continue
            candles.append(candle)
            at.append(i)
        if at:
            try:
                answers: list[ChartForecast | Exception] = self.run_many(np.stack(images), candles)
            except Exception as exc:  # noqa: BLE001 - onnxruntime's own errors, reported per chart
                answers = [exc] * len(at)
            for i, a in zip(at, answers):
                out[i] = a
        return out  # type: ignore[return-value]

    def run_many(self, images: np.ndarray, candles: Sequence[Candle]) -> list[ChartForecast | Exception]:
        """``images`` uint8 [n, N, N, 3] and each one's last candle -> one session call: the images
        stacked, the texts tokenised and padded to the graph's ``max_tokens`` together. A row that
        answers non-finite numbers is a ``ValueError`` for that chart alone."""
        spec = self.spec
        n = len(candles)
        texts = [candle_text(*c, spec=spec.text) for c in candles]
        tok = tokenize(self.tokenizer, texts, spec.max_tokens)
        probs, scaled = self.session.run(list(OUTPUTS), {"image": np.ascontiguousarray(images, dtype=np.uint8), **tok})
        p = np.asarray(probs, dtype=np.float64)
        y = np.asarray(scaled, dtype=np.float64).reshape(-1)
        if p.size != 3 * n or y.shape != (n,):
            raise ValueError(f"{spec.label} answered probabilities of shape {list(p.shape)} and next closes of shape "
                             f"{list(np.shape(scaled))} for {n} chart(s): not [n, 3] and [n]")
        p = p.reshape(n, 3)
        out: list[ChartForecast | Exception] = []
        for row, yi, candle, text in zip(p, y, candles, texts):
            if not np.isfinite(row).all() or not math.isfinite(yi):
                out.append(ValueError(f"{spec.label} answered probabilities {row.tolist()} and next close {yi}: "
                                      "not 3 finite numbers and one"))
                continue
            out.append(ChartForecast(
                probabilities={c: float(v) for c, v in zip(spec.classes, row)},
                predicted_class=spec.classes[int(np.argmax(row))],
                next_close=candle[3] * (1.0 + float(yi) * spec.scale),
                text=text,
            ))
        return out


def _line(exc: BaseException) -> str:
    s = str(exc).strip()
    return s.splitlines()[0] if s else type(exc).__name__
