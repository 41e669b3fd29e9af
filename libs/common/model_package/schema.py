"""``klinebus.json``: the package's metadata schema, its constants and ``PackageError``.

Layout (../shared/DESIGN.md, "Model packages"; format 2 adds the manifest)::

    <registry>/<model-name>/<version>/
      model.onnx               one self-contained ONNX file (weights inside), dynamic batch
      model.int8.onnx          optional: a faster serving variant of model.onnx (int8 recurrent weights),
                               checked against it on real windows by the trainer; named with its sha256
                               in ``config.fast_model``, hashed by the manifest like every file
      klinebus.json            ``ModelPackage`` below: what serving needs and what the model is
      README.md                model card (Hugging Face format: YAML front matter, then the numbers)
      tokenizer/               only for models that read text
      klinebus.manifest.json   every other file with its size and sha256 (``files.py``); the package's
                               digest, the one ``models.v1`` announces, is the sha256 of this file
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PACKAGE_FORMAT = 2  # 2: klinebus.manifest.json hashes every file; 1 (only model.onnx hashed) is refused
MODEL_FILE = "model.onnx"
FAST_MODEL_FILE = "model.int8.onnx"  # optional serving variant (services/trainer/export.py writes it)
META_FILE = "klinebus.json"
CARD_FILE = "README.md"
TOKENIZER_DIR = "tokenizer"
MANIFEST_FILE = "klinebus.manifest.json"
STAGING_PREFIX = ".staging-"
HF_SCHEME = "hf://"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class PackageError(ValueError):
    """A package that is missing, malformed or does not match what was announced (one line)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """One ONNX graph input or output. Symbolic dimensions (``"batch"``) are strings."""

    name: str
    dtype: Literal["float32", "float64", "int64", "int32", "uint8", "bool", "string"]
    shape: list[int | str]
    meaning: str = ""


class Scaler(_Strict):
    """An affine per-column scaling fitted on the training slice only: ``scaled = (x - center) / scale``.

    A standard scaler has center = mean and scale = std; a min-max scaler center = min and
    scale = max - min. Zero scales are stored as 1 (a constant column stays constant).
    """

    kind: Literal["standard", "minmax"]
    columns: list[str]
    center: list[float]
    scale: list[float]

    @model_validator(mode="after")
    def _lengths(self) -> Scaler:
        if not (len(self.columns) == len(self.center) == len(self.scale)):
            raise ValueError("scaler columns, center and scale must have the same length")
        if any(s == 0 for s in self.scale):
            raise ValueError("scaler scale must be non-zero")
        return self


class Served(_Strict):
    symbol: str
    interval: str


class TimeRange(_Strict):
    """A slice of the data by candle open time (ms, both ends inclusive) and its sample count."""

    start: int
    end: int
    rows: int = Field(ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> TimeRange:
        if self.end < self.start:
            raise ValueError(f"range end {self.end} is before its start {self.start}")
        return self


class Ranges(_Strict):
    train: TimeRange
    validation: TimeRange
    test: TimeRange
    embargo: int = Field(0, ge=0, description="candles left out between consecutive slices")

    @model_validator(mode="after")
    def _later(self) -> Ranges:
        if not (self.train.end < self.validation.start and self.validation.end < self.test.start):
            raise ValueError("train, validation and test ranges must follow each other in time")
        return self


class ModelPackage(_Strict):
    """``klinebus.json``."""

    format: int = PACKAGE_FORMAT
    name: str
    version: str = Field(description="positive integer as a decimal string; versions only grow")
    kind: str = Field(description="bilstm-ohlc, lstm-close, chart-classifier, ...")
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    feature_set: str
    features: list[str] = Field(description="feature names in the order of the input's last axis")
    skipped_features: dict[str, str] = Field(
        default_factory=dict, description="features of the set left out, with the reason"
    )
    targets: list[str] = Field(default_factory=list, description="what the outputs forecast, in order")
    lookback: int = Field(ge=1)
    horizons: list[int] = Field(description="candles ahead each forecast step refers to")
    scalers: dict[str, Scaler] = Field(default_factory=dict)
    input_scaling: Literal["in-graph", "caller"] = Field(
        "in-graph",
        description="in-graph: feed raw feature values, the graph applies scalers['inputs'] (and decodes "
        "its outputs to prices) itself; caller: scale inputs with scalers['inputs'] before running it",
    )
    serves: list[Served]
    ranges: Ranges
    metrics: dict[str, float]
    baseline_metrics: dict[str, dict[str, float]]
    promoted: bool
    promotion_reason: str = ""
    sha256: str = Field(description="sha256 of model.onnx (every file, this one included, is in the manifest)")
    code_version: str
    created_at: int = Field(default_factory=lambda: int(time.time() * 1000))
    config: dict[str, Any] = Field(default_factory=dict, description="the whole training config")
    evaluation: dict[str, Any] = Field(
        default_factory=dict, description="full scorecards (validation, test, walk-forward folds, export check)"
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"model name {v!r} must match {_NAME.pattern}")
        return v

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        if not v.isdigit() or int(v) < 1 or v != str(int(v)):
            raise ValueError(f"version {v!r} must be a positive integer without leading zeros")
        return v

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str) -> str:
        if v and not _SHA256.match(v):
            raise ValueError("sha256 must be 64 lower-case hex digits")
        return v

    @field_validator("horizons")
    @classmethod
    def _horizons(cls, v: list[int]) -> list[int]:
        if not v or any(h < 1 for h in v) or sorted(set(v)) != v:
            raise ValueError("horizons must be a non-empty increasing list of positive integers")
        return v

    def serves_pair(self, symbol: str, interval: str) -> bool:
        return any(s.symbol == symbol and s.interval == interval for s in self.serves)


def parse_meta(text: str, where: str) -> ModelPackage:
    try:
        return ModelPackage.model_validate(json.loads(text))
    except json.JSONDecodeError as e:
        raise PackageError(f"{where}: {META_FILE} is not JSON ({e.msg} at line {e.lineno})") from None
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise PackageError(f"{where}: {META_FILE} field {loc}: {first['msg']}") from None
